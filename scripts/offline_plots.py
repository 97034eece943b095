"""Write .dvc/plots/offline.html: DVC's plots page template with Vega's code inline, so that
`dvc plots show` renders without a network (DVC's own page loads it from a CDN).

    python scripts/offline_plots.py      (make setup runs it)

The three packages are DVC's own choice of versions (dvc_render/vega.py), downloaded from the
npm registry and checked against the registry's sha512. .dvc/config names the template.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

TARGET = Path(__file__).resolve().parent.parent / ".dvc" / "plots" / "offline.html"
REGISTRY = "https://registry.npmjs.org"
PACKAGES = [  # name, version, file in the package, the registry's integrity
    ("vega", "5.20.2", "build/vega.min.js",
     "qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw=="),
    ("vega-lite", "5.2.0", "build/vega-lite.min.js",
     "Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw=="),
    ("vega-embed", "6.18.2", "build/vega-embed.min.js",
     "wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg=="),
]
# dvc_render's page (dvc_render/html.py), with Vega's code where its {scripts} (CDN links) go.
# dvc_render fills {refresh_tag} and {plot_divs} by plain replacement.
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC plots</title>
@SCRIPTS@
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""
PLACEHOLDERS = ("{scripts}", "{plot_divs}", "{refresh_tag}")


def fetch(name: str, version: str, member: str, integrity: str) -> str:
    url = f"{REGISTRY}/{name}/-/{name}-{version}.tgz"
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            tarball = response.read()
    except OSError as exc:
        raise SystemExit(f"error: {url}: cannot download: {exc}") from None
    digest = base64.b64encode(hashlib.sha512(tarball).digest()).decode()
    if digest != integrity:
        raise SystemExit(f"error: {url}: sha512 {digest} is not the pinned {integrity}")
    with tarfile.open(fileobj=io.BytesIO(tarball)) as archive:
        code = archive.extractfile(f"package/{member}").read().decode("utf-8")
    for text in ("</script", *PLACEHOLDERS):  # would end the element, or be filled in by DVC
        if text in code:
            raise SystemExit(f"error: {url}: {member} contains {text!r}")
    return code


def main() -> int:
    scripts = []
    for name, version, member, integrity in PACKAGES:
        scripts.append(f"    <script>/* {name}@{version} */\n{fetch(name, version, member, integrity)}\n"
                       "    </script>")
        print(f"{name}@{version}: checked", file=sys.stderr)
    page = PAGE.replace("@SCRIPTS@", "\n".join(scripts))
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".offline.", suffix=".tmp", dir=TARGET.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(page)
    os.chmod(tmp, 0o644)
    os.replace(tmp, TARGET)
    print(f"wrote {TARGET.relative_to(TARGET.parent.parent.parent)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
