"""The embedded image classifier (fashion-vit): trained here from the vendored Fashion-MNIST
subset, seeded, and loadable as the image_classifier family with its own processor."""
import torch

from ecoflap.data import fashion_mnist as fm


def test_one_epoch_learns_and_is_reproducible(tmp_path):
    from transformers import ViTForImageClassification

    from ecoflap.models.fashion_vit import image_processor, train_fashion_vit
    from ecoflap.models.registry import adapter_for

    record = train_fashion_vit(tmp_path / "a", epochs=1)
    train_fashion_vit(tmp_path / "b", epochs=1)
    a = ViTForImageClassification.from_pretrained(tmp_path / "a").eval()
    b = ViTForImageClassification.from_pretrained(tmp_path / "b").eval()
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert adapter_for(a).family == "image_classifier" and record["trained"]["train_images"] == 6000
    images, labels = fm.load_split("test")
    pixels = image_processor()(images=[fm.to_image(x) for x in images[:500]], return_tensors="pt").pixel_values
    with torch.no_grad():
        top1 = (a(pixel_values=pixels).logits.argmax(1) == torch.as_tensor(labels[:500].astype("int64"))).float().mean()
    assert top1 > 0.4  # ten classes: chance is 0.1
