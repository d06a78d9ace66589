"""Measured figures that tests report (printed at the end of the pytest run by conftest)."""

FIGURES: list[tuple[str, object]] = []


def record(name: str, value: object) -> None:
    FIGURES.append((name, value))
