"""Plain-text reports: tables for the closing summaries of the tools, and logged steps."""
import math
from typing import List, Optional, Sequence


def human_number(value: Optional[float]) -> str:
    """1234567 -> '1.235M'; None or NaN -> 'n/a'."""
    if value is None or math.isnan(value):
        return 'n/a'
    for unit, scale in (('G', 1e9), ('M', 1e6), ('K', 1e3)):
        if abs(value) >= scale:
            return f'{value / scale:.3f}{unit}'
    return f'{value:.0f}'


def format_rows(rows: Sequence[Sequence[str]]) -> List[str]:
    """Left-aligned columns, two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        '  '.join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows
    ]


def log_step(message: str, verbose: bool) -> None:
    """A step of a conversion or check, to mmengine's current logger when ``verbose``."""
    if verbose:
        from mmengine.logging import print_log
        print_log(message, logger='current')
