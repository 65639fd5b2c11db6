"""The embedded vision-language model: a CLIP trained here on the vendored Fashion-MNIST
subset. Two short epochs must already classify held-out photos from text prompts well above
chance, through the same evaluation runner the workflow uses, and calibrate from the same
vendored pairs."""
import torch

from ecoflap.data import fashion_mnist as fm


def test_vendored_subset_is_balanced_and_real():
    images, labels = fm.load_split("train")
    assert images.shape == (6000, 28, 28) and images.dtype.name == "uint8"
    assert torch.bincount(torch.as_tensor(labels.astype("int64"))).tolist() == [600] * 10
    assert 60 < images.mean() < 90  # grey products on black, as Fashion-MNIST's mean of about 73
    test_images, test_labels = fm.load_split("test")
    assert test_images.shape == (1000, 28, 28) and sorted(set(test_labels.tolist())) == list(range(10))


def test_two_epochs_of_training_beat_chance_zero_shot(tmp_path):
    from ecoflap.models.image_calibration import build_image_caption_calibration
    from ecoflap.evaluation.vision_language import evaluate_vision_language
    from ecoflap.models.registry import adapter_for
    from ecoflap.models.fashion_clip import train_fashion_clip
    from ecoflap.models.loading import load_model

    info = train_fashion_clip(tmp_path, epochs=2)
    assert info["trained"]["train_images"] == 6000
    model, procs = load_model(tmp_path, torch.device("cpu"), torch.float32)
    metrics, _ = evaluate_vision_language(model, procs, adapter_for(model),
                                          {"task": "classification", "dataset": "fashion_mnist", "limit": 300,
                                           "batch_size": 100})
    assert metrics["top1"] > 25  # chance is 10
    calib = build_image_caption_calibration(tmp_path, "fashion-mnist", 8, 0, {}, "")
    assert calib["pixel_values"].shape == (8, 3, 28, 28) and calib["input_ids"].shape[0] == 8
    again = build_image_caption_calibration(tmp_path, "fashion-mnist", 8, 0, {}, "")
    assert all(torch.equal(calib[k], again[k]) for k in calib)  # seeded
