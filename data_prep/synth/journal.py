"""Append-as-you-go output that survives a restart: rows go to OUT (JSONL) as each unit of work (a request, a
chunk) finishes, then the unit is recorded in OUT.state.json (written atomically). On restart, rows of a unit that
was not recorded (a crash between the two writes) are dropped, and recorded units are not asked again."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from ..jsonl import read_jsonl


class Journal:
    def __init__(self, out: Path, config: dict[str, Any]):
        self.out = Path(out)
        self.state_path = self.out.with_name(self.out.name + ".state.json")
        self.state: dict[str, Any] = {"config": config, "done": [], "counts": {}}
        if self.state_path.exists():
            self.state = json.loads(self.state_path.read_text(encoding="utf-8"))
            if self.state.get("config") != config:
                changed = sorted(k for k in set(config) | set(self.state.get("config", {}))
                                 if config.get(k) != self.state.get("config", {}).get(k))
                from ..errors import DataError

                raise DataError(f"{self.out}: an earlier run used other settings ({', '.join(changed)}); continue with the same "
                                "settings, or write to a new --out")
        self.done = set(self.state["done"])
        self.counts = Counter(self.state["counts"])
        self.rows: list[dict[str, Any]] = []
        if self.out.exists():
            self.rows = read_jsonl(self.out)
            good = [r for r in self.rows if r.get("origin", {}).get("unit") in self.done]
            if len(good) != len(self.rows):  # a unit written but not recorded: it will be asked again
                self.rows = good
                self._rewrite()
        self.out.parent.mkdir(parents=True, exist_ok=True)

    def _rewrite(self) -> None:
        tmp = self.out.with_name(self.out.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for r in self.rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, self.out)

    def commit(self, unit: str, rows: list[dict[str, Any]], counts: Counter) -> None:
        with open(self.out, "a", encoding="utf-8") as f:
            for r in rows:
                r.setdefault("origin", {})["unit"] = unit
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows.extend(rows)
        self.done.add(unit)
        self.counts.update(counts)
        self.state["done"].append(unit)
        self.state["counts"] = dict(self.counts)
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        tmp.write_text(json.dumps(self.state, indent=1), encoding="utf-8")
        os.replace(tmp, self.state_path)
