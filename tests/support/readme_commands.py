"""The ``ray job submit`` commands of README.md's cluster section, read as a shell would split them, and the
substitutions a test on one machine may make: placeholders (``BUCKET``, ``RUN_ID``, the job server's address) and
scale (the config file, ``--set`` overrides for a small CPU run). Nothing else of a command is changed."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

CLUSTER_SECTION = "## Running on a Ray cluster (AWS)"
SUBMIT = ("ray", "job", "submit")


@dataclass
class JobCommand:
    """One ``ray job submit ... -- ENTRYPOINT`` of the README: the submit options and the entrypoint argv."""

    submit: list[str]
    entrypoint: list[str]

    @property
    def subcommand(self) -> str:
        """``pretrain``, ``lincls``, ``sweep``, ...: the mocolab subcommand the job runs."""
        assert self.entrypoint[0] == "mocolab", self.entrypoint
        return self.entrypoint[1]

    def argv(self, replace: dict[str, str], config: str | None = None, extra: list[str] = ()) -> list[str]:
        """The command with each placeholder of ``replace`` substituted in every argument, the config file (the
        argument after the subcommand) replaced by ``config`` if given, and ``extra`` appended."""

        def sub(arg: str) -> str:
            for placeholder, value in replace.items():
                arg = re.sub(rf"\b{re.escape(placeholder)}\b", value, arg)
            return arg

        entry = [sub(arg) for arg in self.entrypoint]
        if config is not None:
            entry[2] = config
        return [sub(arg) for arg in self.submit] + ["--"] + entry + list(extra)


def section(readme: str, heading: str = CLUSTER_SECTION) -> str:
    """The text under ``heading`` up to the next heading of any level (lines inside fenced code blocks, such as shell
    comments, are no headings)."""
    lines = readme[readme.index(heading) :].splitlines(keepends=True)
    fenced = False
    for i, line in enumerate(lines[1:], start=1):
        fenced ^= line.startswith("```")
        hashes = len(line) - len(line.lstrip("#"))
        if not fenced and hashes and line[hashes : hashes + 1] == " ":
            return "".join(lines[:i])
    return "".join(lines)


def job_commands(readme: str) -> list[JobCommand]:
    """Every ``ray job submit`` in the fenced bash blocks of the cluster section, in order, split like the shell
    (backslash-newline continuations joined, comments dropped)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", section(readme), re.S):
        for command in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(command, comments=True)
            if tuple(argv[:3]) == SUBMIT:
                cut = argv.index("--")
                found.append(JobCommand(argv[:cut], argv[cut + 1 :]))
    return found


def readme_job_commands(repo: Path) -> dict[str, JobCommand]:
    """The README's job commands by mocolab subcommand (each subcommand once)."""
    commands = job_commands((repo / "README.md").read_text())
    by_name = {command.subcommand: command for command in commands}
    assert len(by_name) == len(commands), "the README submits one subcommand twice"
    return by_name
