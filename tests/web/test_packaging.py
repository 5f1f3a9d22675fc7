"""The browser client the server ships is the npm package's, byte for byte; both ship their files."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import ROOT
from tests.web.conftest import CLIENT_DIR

WEB = ROOT / "src" / "transcribe_gateway" / "web"


def test_served_client_is_identical_to_the_npm_package_sources() -> None:
    package = {p.name: p.read_bytes() for p in (CLIENT_DIR / "src").glob("*.js")}
    served = {p.name: p.read_bytes() for p in (WEB / "client").glob("*.js")}
    assert package.keys() == served.keys() and package, "copy clients/js/src/*.js to web/client/"
    for name in package:
        assert served[name] == package[name], f"web/client/{name} drifted from clients/js/src"


def test_npm_package_exports_and_types_exist() -> None:
    manifest = json.loads((CLIENT_DIR / "package.json").read_text())
    assert manifest["type"] == "module"
    for target in (manifest["main"], manifest["types"], manifest["exports"]["."]["default"]):
        assert (CLIENT_DIR / target).is_file(), target
    lock = json.loads((CLIENT_DIR / "package-lock.json").read_text())
    assert lock["packages"][""]["devDependencies"] == manifest["devDependencies"]


def test_npm_readme_links_only_to_what_the_package_ships() -> None:
    """npm shows the README without the repository around it: a relative link out of
    the package (``../../docs/browser.md``) is dead there."""
    manifest = json.loads((CLIENT_DIR / "package.json").read_text())
    shipped = [(CLIENT_DIR / name).resolve() for name in manifest["files"]]
    readme = (CLIENT_DIR / "README.md").read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", readme):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # absolute URL, or an anchor in the README itself
        path = (CLIENT_DIR / target.split("#")[0]).resolve()
        assert path.exists() and any(path == root or root in path.parents for root in shipped), (
            f"README.md links to {target}, which the npm package does not ship"
        )


def test_wheel_contains_the_demo_page(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("transcribe_gateway-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in sorted(WEB.rglob("*")):
        if path.is_file():
            assert f"transcribe_gateway/web/{path.relative_to(WEB)}" in names, path


def test_client_type_checks_with_its_declarations(node_modules: Path) -> None:
    """``tsc`` (strict, checkJs) over the JSDoc sources and a consumer of index.d.ts."""
    run = subprocess.run(
        ["npm", "run", "--silent", "check"],
        cwd=CLIENT_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
