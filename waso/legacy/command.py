"""`waso legacy scan DIR --mapping FILE [-o json|text] [--write-manifests OUT]`.

Exit codes: 0 when the scan completed, whatever it found; 2 when an argument is unusable (the
directory, the mapping, company names that give no namespace, the output directory), with the
reason on standard error; 1 when writing a manifest failed after the checks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from waso.legacy.manifests import ManifestError, check_output, namespaces, write_manifests
from waso.legacy.mapping import MappingError, load_mapping
from waso.legacy.scan import ScanError, render_text, scan_tree

PROG = "waso legacy scan"


def scan_command(directory: str, mapping: str, output: str = "text", manifests: str | None = None) -> int:
    try:
        company_mapping = load_mapping(Path(mapping))
        if manifests is not None:
            namespaces(company_mapping)
            check_output(Path(manifests))
        report = scan_tree(Path(directory), company_mapping)
    except (MappingError, ManifestError, ScanError) as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    if output == "json":
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(render_text(report), end="")
    if manifests is not None:
        try:
            written = write_manifests(report, Path(manifests))
        except ManifestError as error:
            print(f"{PROG}: {error}", file=sys.stderr)
            return 1
        print(f"{PROG}: wrote {', '.join(str(path) for path in written)}", file=sys.stderr)
    return 0
