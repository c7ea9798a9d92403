"""clipforge.captioning.loading.load_captioner: the one loader behind ``clipforge caption`` and
``clipforge index --describe`` (kinds, methods, and the same messages naming each command's option)."""
import pytest

from clipforge.captioning import MacCapCaptioner, MacCapConfig, load_captioner, train_maccap
from clipforge.errors import ConfigError
from clipforge.models import CoCa, create_model, save_model


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, small_clip, small_overrides):
    d = tmp_path_factory.mktemp("captioners")
    mm = {"layers": 1, "heads": 2, "n_queries": 4, "pool_heads": 2}
    coca = save_model(create_model("coca-tiny", seed=0, **small_overrides, multimodal=mm), d / "coca")
    plain = save_model(small_clip, d / "clip")
    cfg = MacCapConfig(width=16, layers=1, heads=2, n_queries=2, align_heads=2, n_features=3, max_len=8, n_candidates=2)
    cap, _ = train_maccap(small_clip, ["a red circle.", "two blue squares."], cfg, steps=1, batch_size=2)
    cap.save(d / "mc")
    return {"coca": coca, "clip": plain, "maccap": d / "mc"}


@pytest.mark.parametrize("method", [None, "greedy", "beam"])
def test_coca_loads_for_greedy_and_beam(dirs, method):
    kind, model, transform = load_captioner(dirs["coca"], method)
    assert kind == "coca" and isinstance(model, CoCa) and not model.training
    assert callable(transform)


@pytest.mark.parametrize("method", [None, "maccap"])
def test_maccap_directory_loads(dirs, method):
    kind, cap, transform = load_captioner(dirs["maccap"], method)
    assert kind == "maccap" and isinstance(cap, MacCapCaptioner) and callable(transform)


@pytest.mark.parametrize("option", ["--method", "--describe-method"])
def test_bad_inputs_name_the_option_and_the_fix(dirs, option):
    with pytest.raises(ConfigError, match="without a captioning decoder; captioning needs a decoder: a CoCa"):
        load_captioner(dirs["clip"], None, method_option=option)
    with pytest.raises(ConfigError, match=f"{option} maccap needs a MacCap decoder directory"):
        load_captioner(dirs["coca"], "maccap", method_option=option)
    with pytest.raises(ConfigError, match=f"decodes with {option} maccap .* not {option} beam"):
        load_captioner(dirs["maccap"], "beam", method_option=option)
    with pytest.raises(ConfigError, match=f"{option} must be one of greedy, beam, maccap"):
        load_captioner(dirs["coca"], "sample", method_option=option)
