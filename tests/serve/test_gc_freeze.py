"""`clipforge serve` exempts what it loaded from Python's cyclic collector before serving (freeze_loaded_objects).

A full collection over a loaded model and index held the GIL for 130-190 ms under load (docs/performance.md); after
`gc.freeze()` only objects made while serving are walked. The freeze is the serving process's, not the application
factory's: building an app in a test or notebook leaves the host's collector alone.
"""
from __future__ import annotations

import gc
import json
import weakref

import pytest

from clipforge.cli import serve as serve_cli
from clipforge.cli.main import main


@pytest.fixture
def unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()  # what a test froze goes back to the collector: the rest of the suite runs as before


class _Cycle:
    def __init__(self):
        self.me = self


def _cycle_collected() -> bool:
    c = _Cycle()
    ref = weakref.ref(c)
    del c
    gc.collect()
    return ref() is None


def test_serve_freezes_loaded_objects_before_uvicorn_runs_and_new_garbage_is_still_collected(searcher, monkeypatch,
                                                                                           unfrozen):
    pytest.importorskip("uvicorn")
    import uvicorn

    seen = {}

    def fake_run(app, **kwargs):
        seen["frozen"] = gc.get_freeze_count()
        seen["app"] = app
        seen["new cycles collected"] = _cycle_collected()

    monkeypatch.setattr(uvicorn, "run", fake_run)
    frozen_before = gc.get_freeze_count()
    assert main(["serve", str(searcher.root), "--backend", "numpy", "--port", "0"]) == 0
    assert frozen_before == 0 and seen["frozen"] > 10_000  # torch, the model, the index, FastAPI
    assert hasattr(seen["app"], "routes")
    assert seen["new cycles collected"]


def test_each_worker_process_freezes_after_building_its_app(searcher, monkeypatch, unfrozen):
    pytest.importorskip("fastapi")
    monkeypatch.setenv(serve_cli.WORKER_SETTINGS, json.dumps({"searcher": {"index_dir": str(searcher.root),
                                                                           "backend": "numpy"}, "app": {}}))
    app = serve_cli.worker_app()
    assert hasattr(app, "routes") and gc.get_freeze_count() > 10_000


def test_building_an_app_leaves_the_host_collector_alone(searcher, unfrozen):
    pytest.importorskip("fastapi")
    from clipforge.serve.app import create_app

    create_app(searcher)
    assert gc.get_freeze_count() == 0
