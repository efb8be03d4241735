import pocketbatch


def test_public_names_import():
    for name in pocketbatch.__all__:
        assert getattr(pocketbatch, name) is not None
