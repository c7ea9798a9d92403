"""`clipforge embed --dtype bf16`: the same embeddings as fp32 up to bf16 rounding, still written as float32."""
import numpy as np
from PIL import Image

import clipforge
from clipforge.cli.main import main
from clipforge.models import save_model


def test_embed_bf16_matches_fp32_up_to_rounding(tmp_path):
    run = save_model(clipforge.create_model("tiny", seed=0), tmp_path / "model")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, color in enumerate([(200, 10, 10), (10, 200, 10), (10, 10, 200)]):
        Image.new("RGB", (70, 60), color).save(imgs / f"{i}.png")
    texts = ["a red circle", "two blue squares next to a large green triangle", "three stars"]
    out = {}
    for dtype in ("fp32", "bf16"):
        assert main(["embed", str(run), "--texts", *texts, "--dtype", dtype,
                     "--out", str(tmp_path / f"t{dtype}.npy")]) == 0
        assert main(["embed", str(run), "--images", str(imgs), "--dtype", dtype,
                     "--out", str(tmp_path / f"i{dtype}.npy")]) == 0
        out[dtype] = (np.load(tmp_path / f"t{dtype}.npy"), np.load(tmp_path / f"i{dtype}.npy"))
    for ref, fast in zip(out["fp32"], out["bf16"]):
        assert fast.dtype == np.float32 and fast.shape == ref.shape
        cos = (ref * fast).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(fast, axis=1)
        assert cos.min() > 0.99, cos
        assert not np.array_equal(ref, fast)  # bf16 really ran
