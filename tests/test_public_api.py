"""The public surface: everything exported, sorted, and shown as `aload.X`."""

import aload


def test_all_is_sorted_and_every_name_exists():
    assert aload.__all__ == sorted(aload.__all__)
    for name in aload.__all__:
        assert hasattr(aload, name), name


def test_public_names_exclude_private_modules():
    public = {name for name in dir(aload) if not name.startswith("_")}
    # bench: once aload.bench is imported
    modules = {"bench", "collate", "loader", "plan", "workers"}
    assert public - modules == set(aload.__all__)


def test_classes_report_the_public_module():
    assert aload.DataLoader.__module__ == "aload"
    assert aload.WorkerInfo.__module__ == "aload"


def test_the_version_is_the_installed_packages():
    from importlib import metadata

    assert aload.__version__ == metadata.version("aload")
    assert aload.__version__[0].isdigit()
