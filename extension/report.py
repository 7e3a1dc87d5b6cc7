"""What one generation has to tell its user, the same in every host: each problem once, with
its severity and column; the masks used (name: hash); the networks applied with their hashes
(A1111's `Lora hashes`, which image sites and PNG-info tools read) and the `<model:>`
checkpoints. A host writes it to its console, infotext and UI (docs/design.md §6); problems
found while sampling are added as they come, so none is lost.

Messages never carry the server's folders: `scrub` (the library's) names them relative to the
host or by their setting, since infotexts end up in every PNG and API answer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from ..parser import Diagnostic, Severity

ERRORS, MASKS, LORA_HASHES, MODEL_HASHES = ("NetWeave errors", "NetWeave masks", "Lora hashes",
                                            "NetWeave models")
INFOTEXT_KEYS = (ERRORS, MASKS, LORA_HASHES, MODEL_HASHES)


@dataclass(frozen=True)
class Problem:
    message: str
    severity: Severity = Severity.ERROR
    column: Optional[int] = None  # in the prompt, 1-based; None: not the prompt's

    def __str__(self) -> str:
        where = f" (column {self.column})" if self.column else ""
        return f"{self.severity}: {self.message}{where}"


class Report:
    def __init__(self, scrub: Callable[[str], str] = str):
        self.scrub = scrub
        self.problems: Dict[str, Problem] = {}  # by its line: a batch's prompts repeat them
        self.masks: Dict[str, str] = {}  # name -> hash
        self.networks: Dict[str, str] = {}  # name as written in the tag -> short hash
        self.models: Dict[str, str] = {}
        self._said = 0

    def add(self, message: str, severity: Severity = Severity.ERROR,
            column: Optional[int] = None) -> None:
        problem = Problem(self.scrub(message), Severity(severity), column)
        self.problems.setdefault(str(problem), problem)

    def add_diagnostics(self, diagnostics: List[Diagnostic]) -> None:
        for d in diagnostics:
            self.add(d.message, d.severity, d.column)

    def lines(self) -> List[str]:
        return list(self.problems)

    def unsaid(self) -> List[str]:
        """The problems not yet written to the console, now marked said."""
        lines = self.lines()[self._said:]
        self._said += len(lines)
        return lines

    def infotext(self) -> Dict[str, str]:
        """NetWeave's entries of the infotext's parameter line (values unquoted: the host
        quotes a value with `,` or `:` as it does its own). `Lora hashes` is A1111's entry,
        names without `:` and `,` as A1111 writes them."""
        out: Dict[str, str] = {}
        if self.masks:
            out[MASKS] = ",".join(f"{m}:{h}" for m, h in self.masks.items())
        if self.networks:
            out[LORA_HASHES] = ", ".join(f"{_bare(n)}: {h}" for n, h in self.networks.items())
        if self.models:
            out[MODEL_HASHES] = ", ".join(f"{_bare(n)}: {h}" for n, h in self.models.items())
        if self.problems:
            out[ERRORS] = " | ".join(self.problems)
        return out


def _bare(name: str) -> str:
    return name.translate(str.maketrans("", "", ":,"))
