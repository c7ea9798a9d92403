"""CLIP-IN's negative images for ``shapes``: an edited copy of the scene, re-rendered, differs from the image
exactly where the edited object is, in the edited attribute."""
import numpy as np
import pytest

from clipforge.data import build_dataset
from clipforge.data.shapes import COLORS, HELDOUT_PAIRS, SIZES, edit_scene, negative_images, object_box, render

SIZE = 48


@pytest.fixture(scope="module")
def shapes():
    return build_dataset("shapes", split="train", size=40, seed=3, image_size=SIZE)


def _hwc(item):
    return item["image"].permute(1, 2, 0).numpy()


def _box_mask(obj, size, margin=1):
    """Pixels of the object's tight box, widened by ``margin`` pixels for the anti-aliased edge."""
    x0, y0, x1, y1 = object_box(obj)
    mask = np.zeros((size, size), dtype=bool)
    mask[max(0, int(y0 * size) - margin):int(np.ceil(y1 * size)) + margin,
         max(0, int(x0 * size) - margin):int(np.ceil(x1 * size)) + margin] = True
    return mask


def test_the_scene_of_an_item_renders_its_image_again(shapes):
    for i in range(len(shapes)):
        item = shapes[i]
        assert np.array_equal(render(item["objects"], SIZE, item["background"]), _hwc(item))


@pytest.mark.parametrize("kind", ["color", "remove"])
def test_an_edit_changes_exactly_the_edited_object(shapes, kind):
    rng = np.random.default_rng(0)
    for i in range(len(shapes)):
        item = shapes[i]
        objects, original = item["objects"], _hwc(item)
        edited, edit = edit_scene(objects, rng, kind)
        image = render(edited, SIZE, item["background"])
        obj = objects[edit["object"]]
        changed = (image != original).any(-1)
        inside = _box_mask(obj, SIZE)
        assert changed.any() and not (changed & ~inside).any(), i  # every changed pixel lies at the edited object
        cy, cx = int(obj.y * SIZE), int(obj.x * SIZE)  # the object's center pixel lies well inside it
        assert tuple(original[cy, cx]) == COLORS[obj.color]
        if kind == "color":
            assert len(edited) == len(objects) and edit["color"] != obj.color
            assert (edit["color"], obj.shape) not in HELDOUT_PAIRS  # no held-out compositional pair is shown
            assert tuple(image[cy, cx]) == COLORS[edit["color"]]
            # the same shape at the same place: only the color moved, so the changed pixels are the object's
            others = [o for j, o in enumerate(objects) if j != edit["object"]]
            assert edited[edit["object"]] == type(obj)(obj.shape, edit["color"], obj.size, obj.x, obj.y)
            assert [o for j, o in enumerate(edited) if j != edit["object"]] == others
            r = int(SIZES[obj.size] * SIZE * 0.25)  # a square well inside any of the shapes: all of it recolored
            assert (image[cy - r:cy + r + 1, cx - r:cx + r + 1] == COLORS[edit["color"]]).all()
        else:
            assert edited == objects[:edit["object"]] + objects[edit["object"] + 1:]
            assert tuple(image[cy, cx]) == tuple(item["background"])  # the object is gone: background there


def test_negative_images_alternate_the_edits_and_are_deterministic(shapes):
    item = shapes[5]
    a = negative_images(item["objects"], item["background"], SIZE, 4, np.random.default_rng(7))
    b = negative_images(item["objects"], item["background"], SIZE, 4, np.random.default_rng(7))
    assert [e for _, e in a] == [e for _, e in b] and all(np.array_equal(x, y) for (x, _), (y, _) in zip(a, b))
    kinds = [e["kind"] for _, e in a]
    assert kinds[0] != kinds[1] and kinds[:2] == kinds[2:]
    with pytest.raises(ValueError, match="unknown scene edit"):
        edit_scene(item["objects"], np.random.default_rng(0), "blur")
