"""True IoU per predicted mask, mask AP and the cross-round de-duplication rule."""

import numpy as np
from pycocotools import mask as mask_utils

from maskprop.data.instances import deduplicate, mask_ap, true_ious


def rle(y0, y1, x0, x1, size=20):
    m = np.zeros((size, size), dtype=np.uint8)
    m[y0:y1, x0:x1] = 1
    r = mask_utils.encode(np.asfortranarray(m))
    return {"size": [size, size], "counts": r["counts"].decode("ascii")}


def test_rle_round_trips_through_json_form():
    m = np.zeros((20, 20), dtype=np.uint8)
    m[3:9, 4:15] = 1
    r = rle(3, 9, 4, 15)
    back = mask_utils.decode({"size": r["size"], "counts": r["counts"].encode()})
    assert np.array_equal(back, m)


def test_true_iou_is_the_best_match_of_the_same_image_and_class():
    gt = [
        {"image_id": 1, "class_id": 0, "segmentation": rle(0, 10, 0, 10)},
        {"image_id": 1, "class_id": 0, "segmentation": rle(10, 20, 10, 20)},
        {"image_id": 1, "class_id": 1, "segmentation": rle(0, 10, 0, 5)},
        {"image_id": 2, "class_id": 0, "segmentation": rle(0, 10, 0, 10)},
    ]
    preds = [rle(0, 10, 0, 10), rle(10, 20, 10, 15), rle(0, 10, 0, 10), rle(0, 10, 0, 10)]
    ious = true_ious(np.array([1, 1, 1, 3]), np.array([0, 0, 1, 0]), preds, gt)
    # exact; half of the second object; class 1's object is half the box; image 3 has no gt
    assert np.allclose(ious, [1.0, 0.5, 0.5, 0.0])


def test_deduplicate_drops_later_overlapping_masks_of_the_same_image_and_class():
    anns = [
        {"image_id": 1, "category_id": 1, "segmentation": rle(0, 10, 0, 10)},  # round 1
        {"image_id": 1, "category_id": 1, "segmentation": rle(0, 10, 1, 10)},  # IoU 0.9: drop
        {"image_id": 1, "category_id": 2, "segmentation": rle(0, 10, 0, 10)},  # other class
        {"image_id": 2, "category_id": 1, "segmentation": rle(0, 10, 0, 10)},  # other image
        {"image_id": 1, "category_id": 1, "segmentation": rle(0, 10, 5, 15)},  # IoU 1/3: keep
        {"image_id": 1, "category_id": 1, "segmentation": rle(0, 10, 10, 20)},  # 1/3 vs [4]
        {"image_id": 2, "category_id": 1, "segmentation": rle(0, 10, 0, 5)},  # IoU 0.5: keep
    ]
    assert deduplicate(anns) == [0, 2, 3, 4, 5, 6]
    # earlier wins: the same pair in the other order keeps the other mask
    assert deduplicate([anns[1], anns[0]]) == [0]


def test_mask_ap_of_perfect_and_empty_results():
    gt = {
        "images": [{"id": 1, "width": 20, "height": 20, "file_name": "a.png"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "segmentation": rle(0, 10, 0, 10),
                "area": 100.0,
                "bbox": [0, 0, 10, 10],
                "iscrowd": 0,
            },
        ],
        "categories": [{"id": 1, "name": "disc"}],
    }
    perfect = [{"image_id": 1, "category_id": 1, "segmentation": rle(0, 10, 0, 10), "score": 0.9}]
    assert mask_ap(gt, perfect)["ap"] > 0.99
    wrong = [{"image_id": 1, "category_id": 1, "segmentation": rle(10, 20, 10, 20), "score": 0.9}]
    assert mask_ap(gt, wrong)["ap"] == 0.0
    assert mask_ap(gt, []) == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0}
