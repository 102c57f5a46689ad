import pytest

torch = pytest.importorskip(
    "torch", reason="the detector needs torch: pip install -e '.[detector]'"
)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.fixture
def tiny_cfg():
    from maskprop_detector.model import DetectorConfig

    return DetectorConfig(classes=("disc", "square"), image_size=64, fpn_channels=16, feature_dim=8)


def untrained_pool(root, n_images, max_detections, classes=("disc", "square")):
    """``n_images`` synthetic 64 px scenes under ``root/synth/images/pool`` and an untrained
    tiny detector's weights at ``root/w.pt``, with the filters off (an untrained model finds
    masks only then): for tests of the wiring, not of accuracy."""
    from maskprop_detector.model import DetectorConfig, build_model
    from maskprop_detector.train import save_checkpoint

    from maskprop.data.synth import synth_scenes

    synth_scenes(n_images, root / "synth", size=64, classes=classes, split={"pool": 1.0})
    cfg = DetectorConfig(
        classes=classes, image_size=64, fpn_channels=16, feature_dim=8,
        score_threshold=0.0, min_box_area=0.0, max_detections=max_detections,
    )  # fmt: skip
    save_checkpoint(root / "w.pt", build_model(cfg), cfg)
    return root / "w.pt"


def scene_batch(n, size=64, classes=("disc", "square")):
    """(images, targets) of rendered synthetic scenes, in torchvision's training format."""
    import numpy as np
    from torchvision.ops import masks_to_boxes

    from maskprop.data.synth import render_scene

    images, targets = [], []
    for k in range(n):
        sc = render_scene(1, k, size=size, classes=classes, max_objects=3)
        images.append(torch.from_numpy(np.array(sc.image)).permute(2, 0, 1).float() / 255)
        masks = torch.from_numpy(sc.visible.astype(np.uint8))
        targets.append(
            {
                "boxes": masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0]),
                "labels": torch.from_numpy(sc.class_ids + 1),
                "masks": masks,
            }
        )
    return images, targets
