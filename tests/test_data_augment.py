

def test_uint8_views_are_normalised_once_as_the_reference_normalises():
    image = _image(32, 32)
    reference = build_pipeline("none", 32)(image=image)["image"]
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None]
    assert torch.allclose(normalize_views(pixels)[0], reference, atol=1e-5)
    assert normalize_views(reference[None]) is not None and torch.equal(normalize_views(reference[None])[0], reference)
