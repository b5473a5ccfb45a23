"""User mistakes are `UserError`s: the CLI prints them plainly and exits 2, with no traceback."""


class UserError(Exception):
    """Something the user can fix (bad data, a wrong flag, a missing file)."""


class DataError(UserError):
    """Problems found in data files, each naming its file and line or sample."""

    def __init__(self, problems: list[str], total: int | None = None, note: str = ""):
        """`note`: said once, after the count (e.g. how rows are numbered)."""
        self.problems = problems
        self.total = total if total is not None else len(problems)
        shown = "\n".join(f"  - {p}" for p in problems)
        more = f"\n  ... and {self.total - len(problems)} more" if self.total > len(problems) else ""
        super().__init__(f"{self.total} problem(s) in the data{f' ({note})' if note else ''}:\n{shown}{more}")
