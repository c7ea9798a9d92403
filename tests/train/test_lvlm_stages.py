"""The LVLM's training stages (clipforge/train/lvlm.py): which parameters each stage trains, the teacher's
embeddings against the LM run caption by caption, and one discriminative step's loss against its parts."""
import pytest
import torch

from clipforge.errors import ConfigError
from clipforge.interop.text_tokenizers import CausalLMTokenizer
from clipforge.models import create_model
from clipforge.train.lvlm import LVLMTrainConfig, TeacherEmbedder, build_lvlm, select_trainable
from tests.reference.tiny_lm import make_tiny_lm

VISION = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2}


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return make_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


def _model(lm_dir, soft=0):
    return create_model("lvlm-tiny", seed=0, vision=VISION, lvlm={"path": str(lm_dir), "soft_prompt_tokens": soft})


def _trained(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_each_stage_trains_its_parameters(lm_dir):
    caption = _trained(_model(lm_dir))
    m = _model(lm_dir)
    select_trainable(m, LVLMTrainConfig(stage="caption", lm=str(lm_dir)))
    assert _trained(m) == caption - {"logit_scale"} and any(n.startswith("lm.") for n in _trained(m))
    m = _model(lm_dir)
    select_trainable(m, LVLMTrainConfig(stage="caption", lm=str(lm_dir), train_lm="frozen"))
    assert _trained(m) and not any(n.startswith("lm.") for n in _trained(m))
    m = _model(lm_dir, soft=3)
    select_trainable(m, LVLMTrainConfig(stage="discriminative", lm=str(lm_dir), lora_rank=2))
    rest = {n for n in _trained(m) if "lora_" not in n}
    assert rest == {"soft_prompt_image", "soft_prompt_text", "logit_scale"}
    assert {n.split(".")[-4] for n in _trained(m) if "lora_" in n} == {"q_proj", "v_proj"}
    m = _model(lm_dir)
    select_trainable(m, LVLMTrainConfig(stage="unime", lm=str(lm_dir), teacher=str(lm_dir), lora_rank=2))
    assert _trained(m) and all("lora_" in n for n in _trained(m))


def test_discriminative_stage_adds_soft_prompts_to_a_saved_lvlm(lm_dir, tmp_path):
    from clipforge.models import save_model

    base = _model(lm_dir)
    save_model(base, tmp_path / "cap")
    m = build_lvlm(LVLMTrainConfig(stage="discriminative", init_from=str(tmp_path / "cap"), soft_prompt_tokens=5))
    assert m.soft_prompt_image.shape == (5, 32)
    for name, p in base.state_dict().items():  # everything else is the saved model's
        assert torch.equal(m.state_dict()[name], p), name


def test_teacher_embeddings_are_the_lms_mean_states_caption_by_caption(lm_dir):
    teacher = TeacherEmbedder(str(lm_dir), None, None, 12)
    texts = ["a red circle", "two blue squares on the left", "a red circle"]
    got = teacher(texts)
    tok = CausalLMTokenizer(lm_dir, 12)
    for b, text in enumerate(texts):
        ids = tok._tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            want = teacher.lm(input_ids=torch.tensor([ids])).last_hidden_state[0].mean(0)
        assert torch.allclose(got[b], want, atol=1e-5)
    assert len(teacher.cache) == 2


def test_bad_configs_are_named(lm_dir):
    with pytest.raises(ConfigError, match="unknown LVLM training stage"):
        LVLMTrainConfig(stage="pretrain", lm="x")
    with pytest.raises(ConfigError, match="--teacher DIR"):
        LVLMTrainConfig(stage="unime", lm="x")
    with pytest.raises(ConfigError, match="--lm DIR"):
        LVLMTrainConfig(stage="caption")
