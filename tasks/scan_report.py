"""The scan's report: every problem (errors stop the run, warnings are logged) and every file's verdict.

    report = ScanReport()
    report.add("error", "corrupt", path, "corrupt or truncated image: re-export or remove it")
    report.markdown()          # reports/scan-report.md: the problems, then every file of every concept
    report.raise_for_errors()  # DatasetError listing each bad file and what to do
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from likeness.stages import PrepareError
from likeness.tasks.scan_files import Verdict

REPORT_LIMIT = 200  # lines per problem kind in the markdown report


@dataclass(frozen=True)
class Issue:
    level: Literal["error", "warning"]
    kind: str
    path: str
    message: str


@dataclass
class ScanReport:
    issues: list[Issue] = field(default_factory=list)
    images: dict[str, int] = field(default_factory=dict)  # concept -> images found
    files: list[Verdict] = field(default_factory=list)  # every file of every concept folder

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.level == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.level == "warning"]

    def add(self, level: Literal["error", "warning"], kind: str, path: Path | str, message: str) -> None:
        self.issues.append(Issue(level, kind, str(path), message))

    def verdict_counts(self, concept: str) -> dict[str, int]:
        counts = {"used": 0, "skipped": 0, "warning": 0, "error": 0}
        for verdict in self.files:
            if verdict.concept == concept:
                counts[verdict.verdict] += 1
        return counts

    def summary(self) -> str:
        """One line per concept: its files by verdict."""
        return "\n".join(f"{name}: {n} image(s); files: " + ", ".join(f"{v} {k}" for k, v in self.verdict_counts(name).items())
                         for name, n in self.images.items())

    def markdown(self, files_limit: int | None = None) -> str:
        lines = ["# Dataset scan", "", "| concept | images | used | skipped | warning | error |", "|---|---|---|---|---|---|"]
        lines += [f"| {name} | {n} | " + " | ".join(str(v) for v in self.verdict_counts(name).values()) + " |"
                  for name, n in self.images.items()]
        for level in ("error", "warning"):
            found = [i for i in self.issues if i.level == level]
            lines += ["", f"## {len(found)} {level}{'s' if len(found) != 1 else ''}"]
            by_kind: dict[str, list[Issue]] = defaultdict(list)
            for issue in found:
                by_kind[issue.kind].append(issue)
            for kind, issues in by_kind.items():
                lines += ["", f"### {kind} ({len(issues)})", ""]
                lines += [f"- `{i.path}`: {i.message}" for i in issues[:REPORT_LIMIT]]
                if len(issues) > REPORT_LIMIT:
                    lines.append(f"- ... and {len(issues) - REPORT_LIMIT} more")
        return "\n".join(lines + self._files_markdown(files_limit)) + "\n"

    def _files_markdown(self, limit: int | None) -> list[str]:
        lines = ["", "## Every file"]
        for name in self.images:
            verdicts = [v for v in self.files if v.concept == name]
            lines += ["", f"### {name}", "", "| file | verdict | why |", "|---|---|---|"]
            lines += [f"| `{v.path}` | {v.verdict} | {v.why} |" for v in verdicts[:limit]]
            if limit is not None and len(verdicts) > limit:
                lines.append(f"| ... | | {len(verdicts) - limit} more in reports/scan-report.md |")
        return lines

    def raise_for_errors(self) -> None:
        if self.errors:
            raise DatasetError(self)


class DatasetError(PrepareError):
    """The dataset has errors; the message lists each file and what to do."""

    def __init__(self, report: ScanReport):
        self.report = report
        lines = [f"  {i.kind}: {i.path}: {i.message}" for i in report.errors]
        super().__init__(f"the dataset has {len(lines)} error(s); fix them and run again:\n" + "\n".join(lines))
