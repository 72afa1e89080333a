"""``--help`` of the command lines: the command's docstring, then every flag the command itself
defines (``--config`` and ``--distributed`` among them), in one list.

absl's own ``--help`` lists only the flags of the module it takes for the program (by
``sys.argv[0]``): it left out ``--config`` and ``--distributed`` (defined through
``cli_errors``), titled the list with a file path under ``python -m``, and listed nothing at all
for an installed console script. absl's ``--helpfull`` still lists every flag, libraries' too.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags

HELP_ARGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort")
# Where this project's flags are defined (beside the program's own module, sys.argv[0]).
OWN_MODULES = ("moco_jax", "benchmarks")


def asks_for_help(argv: Sequence[str]) -> bool:
    """Whether the command line (``argv`` without the program) asks for ``--help``."""
    words = list(argv)
    words = words[: words.index("--")] if "--" in words else words
    return any(word in HELP_ARGS for word in words)


def plain(text: str) -> str:
    """Docstring text for a terminal: without reStructuredText's double backticks."""
    return text.replace("``", "").strip()


def describe(flag: flags.Flag) -> str:
    """One flag as the help shows it: ``--name: help (default: ...)``, wrapped."""
    name = f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}"
    text = f"{name}: {plain(flag.help)}"  # an enum's help starts with its <choices>
    if flag.default is not None and flag.name != "config":  # the config: a file, not a value
        text += f" (default: {flag.default_as_str})"
    return flags.text_wrap(text, indent="      ", firstline_indent="  ")


def command_flags(flag_values: flags.FlagValues, hidden: Sequence[str] = ()) -> list[flags.Flag]:
    """The flags this project defines in ``flag_values`` (not absl's or a library's), by name."""
    own = [
        flag
        for module, module_flags in flag_values.flags_by_module_dict().items()
        if module.startswith(OWN_MODULES) or module == sys.argv[0]
        for flag in module_flags
    ]
    unique = {flag.name: flag for flag in own if flag.name not in hidden}
    return [unique[name] for name in sorted(unique)]


def help_text(
    usage: str, flag_values: flags.FlagValues = flags.FLAGS, hidden: Sequence[str] = ()
) -> str:
    """The whole ``--help``: ``usage`` (the command's docstring) and its flags (but ``hidden``);
    of ``flags.FLAGS``, where absl's ``--helpfull`` lists the rest, a line saying so."""
    lines = [plain(usage), "", "flags:"]
    lines += [describe(flag) for flag in command_flags(flag_values, hidden)]
    if flag_values is flags.FLAGS:
        lines += ["", "--helpfull also lists the flags of absl and the libraries."]
    return "\n".join(lines) + "\n"
