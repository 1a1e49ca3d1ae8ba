"""Every megatron-core workaround is registered in megafox.compat with the version range it was
verified for: upgrading megatron-core fails here until each one has been reviewed against the
new release (dropped where fixed upstream, its range widened where the bug is still there)."""
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from megafox.compat import megatron_core


def test_installed_megatron_core_is_inside_every_workaround_range():
    installed = Version(megatron_core.installed_version())
    assert megatron_core.WORKAROUNDS, "the registry is empty: workarounds are applied without being listed"
    outside = [w.name for w in megatron_core.WORKAROUNDS if installed not in SpecifierSet(w.versions)]
    assert not outside, (f"megatron-core {installed} is outside the verified range of {outside}: review each "
                         "against the release notes / upstream reference in megafox/compat/megatron_core.py")


def test_each_workaround_names_its_upstream_reference():
    for w in megatron_core.WORKAROUNDS:
        assert len(w.upstream) > 20 and SpecifierSet(w.versions), w


def test_workarounds_live_only_in_compat():
    """The monkeypatches of megatron-core internals are applied from one module."""
    from pathlib import Path

    root = Path(megatron_core.__file__).resolve().parents[1]
    needles = ("get_parameter_state_dp_zero", "_get_write_results_queue", "load_parameter_state_from_fully_reshardable")
    offenders = [str(p.relative_to(root.parent)) for p in root.rglob("*.py")
                 if p.parent.name != "compat" and any(n in p.read_text() for n in needles)]
    assert not offenders, offenders
