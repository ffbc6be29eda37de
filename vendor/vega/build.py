"""Rebuild offline.html, the page template of `dvc plots show` / `dvc plots diff` (.dvc/config
`plots.html_template`), from the released npm builds of vega, vega-lite and vega-embed.

DVC's own page loads these three scripts from a CDN, so its data plots stay blank without internet. This
template carries them inline, byte for byte as published (`build/<name>.min.js` of each npm tarball), and
leaves out DVC's script placeholder, which would add the CDN tags back. SOURCES.json records each
tarball's npm integrity and each inlined file's sha256; tests/test_dvc_plots.py checks the page against it.

    python vendor/vega/build.py                  # `npm pack` the newest vega@5, vega-lite@5, vega-embed@6
    python vendor/vega/build.py --from DIR       # or use tarballs already in DIR (vega-5.33.1.tgz, ...)

The licence texts are copied from the tarballs that ship one; vega's tarball has none, so LICENSE-vega.txt
holds the text its source repository and its sub-packages (vega-view, ...) carry.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import subprocess
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGES = ("vega@5", "vega-lite@5", "vega-embed@6")  # vega-embed 6 drives vega 5 and vega-lite 5
TEMPLATE = HERE / "offline.html"
SOURCES = HERE / "SOURCES.json"

# DVC fills three placeholders by plain text replacement: the refresh tag, the plot divs and the scripts.
# The scripts one is left out on purpose (it would bring back the CDN tags); the vega scripts come before
# the plot divs, whose inline scripts call vegaEmbed as the page is parsed.
HEAD = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{refresh_tag}
<title>DVC plots</title>
<!-- vega, vega-lite and vega-embed inlined (BSD-3-Clause, see vendor/vega/ for the licences and sources):
     this page loads nothing from the network. -->
"""
SCRIPT = '<script data-package="{package}">\n{code}</script>\n'
TAIL = """<style>
body { font-family: sans-serif; display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
table { border-spacing: 15px; }
/* A plot none of whose files exists (a model this project does not train) draws an empty view. */
.vega-embed:has(canvas.marks[width="0"]) { display: none; }
</style>
</head>
<body>
{plot_divs}
</body>
</html>
"""


def _sha512_integrity(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def _tarballs(directory: Path) -> list[Path]:
    """The three tarballs, newest of each pinned major, packed into `directory` by npm."""
    listing = subprocess.run(
        ["npm", "pack", *PACKAGES, "--json"], cwd=directory, check=True, capture_output=True, text=True
    ).stdout
    return [directory / entry["filename"] for entry in json.loads(listing)]


def build(tarballs: list[Path]) -> None:
    scripts, sources = [], []
    for tarball in tarballs:
        with tarfile.open(tarball) as archive:
            manifest = json.load(archive.extractfile("package/package.json"))
            name, version = manifest["name"], manifest["version"]
            member = f"package/build/{name}.min.js"
            code = archive.extractfile(member).read().decode("utf-8")
            names = archive.getnames()
            if "package/LICENSE" in names:
                licence = archive.extractfile("package/LICENSE").read()
                (HERE / f"LICENSE-{name}.txt").write_bytes(licence)
        # Inside <script>, only `</script` ends the element early; the builds have none (checked here).
        if "</script" in code.lower():
            raise SystemExit(f"{name}: its build contains </script and cannot be inlined")
        scripts.append(SCRIPT.format(package=f"{name}@{version}", code=code))
        sources.append(
            {
                "package": name,
                "version": version,
                "license": manifest["license"],
                "tarball": f"https://registry.npmjs.org/{name}/-/{name}-{version}.tgz",
                "integrity": _sha512_integrity(tarball),
                "file": member.removeprefix("package/"),
                "sha256": hashlib.sha256(code.encode("utf-8")).hexdigest(),
                "bytes": len(code.encode("utf-8")),
            }
        )
    TEMPLATE.write_text(HEAD + "".join(scripts) + TAIL, encoding="utf-8")
    SOURCES.write_text(json.dumps(sources, indent=2) + "\n", encoding="utf-8")
    packages = ", ".join(f"{source['package']}@{source['version']}" for source in sources)
    print(f"{TEMPLATE}: {TEMPLATE.stat().st_size} bytes ({packages})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source", type=Path, help="a directory holding the three npm tarballs")
    args = parser.parse_args()
    if args.source:
        found = {path.name.rsplit("-", 1)[0]: path for path in sorted(args.source.glob("*.tgz"))}
        build([found[package.split("@")[0]] for package in PACKAGES])
        return
    with tempfile.TemporaryDirectory() as directory:
        build(_tarballs(Path(directory)))


if __name__ == "__main__":
    main()
