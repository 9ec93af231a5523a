"""Build plots/offline.html: DVC's plots page template with vega, vega-lite and vega-embed inlined, so `dvc plots
show` / `dvc plots diff` pages render with no internet (DVC's own page loads them from a CDN: blank offline).

    npm pack vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2     # once, where the npm registry is reachable
    python -m tools.offline_plots --tarballs . --out plots/offline.html

The versions are the ones DVC's own page asks the CDN for (dvc_render VegaRenderer.SCRIPTS). Each tarball's
sha512 is checked against the npm registry's published integrity (below), so the inlined code is exactly what
npm serves. .dvc/config points DVC at the result (`plots.html_template`); the file is committed, so nothing is
downloaded at run time. Licenses: all three BSD-3-Clause (University of Washington Interactive Data Lab); their
texts are kept in the page.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import tarfile
from pathlib import Path

# name -> (version, npm's dist.integrity, the minified UMD build inside the tarball)
LIBRARIES = {
    "vega": (
        "5.20.2",
        "sha512-qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw==",
        "package/build/vega.min.js",
    ),
    "vega-lite": (
        "5.2.0",
        "sha512-Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw==",
        "package/build/vega-lite.min.js",
    ),
    "vega-embed": (
        "6.18.2",
        "sha512-wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg==",
        "package/build/vega-embed.min.js",
    ),
}

# DVC's page (dvc_render.html PAGE_HTML) with the scripts inlined in place of its {scripts} placeholder: DVC
# fills {refresh_tag} and {plot_divs}; without {scripts} it adds no CDN tags.
PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <title>DVC Plot</title>
    <!-- Built by tools/offline_plots.py: {versions}, inlined (BSD-3-Clause, licenses at the end of the page). -->
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
<!--
{licenses}
-->
</body>
</html>
"""


def integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def read_library(tarballs: Path, name: str) -> tuple[str, str]:
    """(the minified build, its LICENSE) from <name>-<version>.tgz, after checking npm's integrity."""
    version, expected, member = LIBRARIES[name]
    path = tarballs / f"{name}-{version}.tgz"
    data = path.read_bytes()
    if integrity(data) != expected:
        raise SystemExit(f"{path}: sha512 differs from npm's published integrity for {name}@{version}")
    with tarfile.open(path) as archive:
        code = archive.extractfile(member).read().decode("utf-8")
        license_text = archive.extractfile("package/LICENSE").read().decode("utf-8")
    if "</script" in code.lower() or "{plot_divs}" in code or "{refresh_tag}" in code:
        raise SystemExit(f"{name}: its code holds a string that would break the inlined page")
    return code, license_text


def build(tarballs: Path) -> str:
    scripts, licenses = [], []
    for name, (version, _integrity, _member) in LIBRARIES.items():
        code, license_text = read_library(tarballs, name)
        scripts.append(f"    <script>/* {name}@{version} */\n{code}\n    </script>")
        licenses.append(f"{name}@{version}:\n{license_text.replace('--', '- -')}")
    versions = ", ".join(f"{name}@{version}" for name, (version, _i, _m) in LIBRARIES.items())
    return PAGE.format(versions=versions, scripts="\n".join(scripts), licenses="\n".join(licenses))


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tools.offline_plots", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--tarballs", type=Path, required=True, help="folder holding the three npm tarballs")
    parser.add_argument("--out", type=Path, default=Path("plots/offline.html"))
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(build(args.tarballs), encoding="utf-8")
    print(f"{args.out}: {args.out.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
