"""What the fuzz targets share: their oracles' checks (the targets import it by name, as
scripts run from this folder)."""


def expect(holds: bool, *context) -> None:
    """
    A property of the oracle: unless it holds, raise AssertionError with
    C{context} (the fuzzer then reports a crash).  Not C{assert}, which
    C{python -O} would remove.
    """
    if not holds:
        raise AssertionError(*context)
