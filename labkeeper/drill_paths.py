"""Compatibility alias: the path-set drill lives in :mod:`labkeeper.drill.paths`."""

from labkeeper.drill.paths import (
    GONE_EXIT,
    SOURCE_SCRIPT,
    Reservoir,
    SnapNode,
    SourceFile,
    Status,
    Verdict,
    judge_file,
    parse_ls_line,
    parse_source,
    paths_drill,
    source_hash_argv,
)

__all__ = [
    "GONE_EXIT",
    "SOURCE_SCRIPT",
    "Reservoir",
    "SnapNode",
    "SourceFile",
    "Status",
    "Verdict",
    "judge_file",
    "parse_ls_line",
    "parse_source",
    "paths_drill",
    "source_hash_argv",
]
