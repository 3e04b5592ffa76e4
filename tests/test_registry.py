"""The entry-point registry: discovery, duplicates, broken plugins, lookups with hints."""

from __future__ import annotations

import logging

import pytest

from ktcore.backends.registry import Registry
from ktcore.backends.spec import BackendSpec, OptionSpec
from ktcore.errors import BackendError
from tests.fake_dists import make_dist, on_sys_path, only_fake_entry_points

REGISTER = '''
from ktcore.backends.spec import BackendSpec
def register(registry):
    registry.add(BackendSpec(name={name!r}, op="experts", devices=("cpu",),
                             factory="ktcore.ops.experts:TorchExperts"))
'''


def test_installed_torch_backends_come_from_the_entry_point():
    registry = Registry.from_entry_points()
    if not any(s.name == "torch" for s in registry.specs()):
        pytest.skip("ktcore is not pip-installed here (no entry points); CI installs it")
    specs = {s.op: s for s in registry.specs() if s.name == "torch"}
    assert set(specs) == {"linear", "experts", "mla", "rope"}
    assert all(s.distribution == "ktcore" and s.version for s in specs.values())
    assert all(registry.unavailable_reason(s) is None for s in specs.values())


def test_fake_distribution_registers_with_its_name_and_version(tmp_path):
    make_dist(tmp_path, "kt-fake", "1.2.3", {"fake": "kt_fake_mod:register"},
              {"kt_fake_mod": REGISTER.format(name="fake")})
    with on_sys_path(tmp_path):
        registry = Registry.from_entry_points(only_fake_entry_points(tmp_path))
    spec = registry.get("fake", "experts")
    assert (spec.distribution, spec.version) == ("kt-fake", "1.2.3")


def test_two_distributions_registering_one_name_is_an_error_naming_both(tmp_path):
    make_dist(tmp_path, "kt-first", "1.0", {"dup": "kt_first_mod:register"},
              {"kt_first_mod": REGISTER.format(name="dup")})
    make_dist(tmp_path, "kt-second", "2.0", {"dup": "kt_second_mod:register"},
              {"kt_second_mod": REGISTER.format(name="dup")})
    with on_sys_path(tmp_path), pytest.raises(BackendError) as info:
        Registry.from_entry_points(only_fake_entry_points(tmp_path))
    assert "kt-first" in str(info.value) and "kt-second" in str(info.value)
    assert "'dup'" in str(info.value)


def test_plugin_whose_import_raises_is_skipped_with_a_warning(tmp_path, caplog):
    make_dist(tmp_path, "kt-broken", "0.1", {"broken": "kt_broken_mod:register"},
              {"kt_broken_mod": "raise ImportError('libfoo.so: cannot open shared object file')\n"})
    make_dist(tmp_path, "kt-fine", "0.1", {"fine": "kt_fine_mod:register"},
              {"kt_fine_mod": REGISTER.format(name="fine")})
    with on_sys_path(tmp_path), caplog.at_level(logging.WARNING):
        registry = Registry.from_entry_points(only_fake_entry_points(tmp_path))
    assert "kt-broken" in caplog.text and "libfoo.so" in caplog.text
    assert registry.get("fine", "experts").distribution == "kt-fine"
    with pytest.raises(BackendError, match=r"kt-broken failed to import: ImportError: libfoo\.so"):
        registry.get("broken", "experts")


def test_register_function_that_raises_is_recorded(tmp_path):
    make_dist(tmp_path, "kt-raiser", "0.1", {"raiser": "kt_raiser_mod:register"},
              {"kt_raiser_mod": "def register(registry):\n    raise RuntimeError('no license file')\n"})
    with on_sys_path(tmp_path):
        registry = Registry.from_entry_points(only_fake_entry_points(tmp_path))
    assert registry.failures["raiser"].error == "RuntimeError: no license file"


def _registry_with(*specs: BackendSpec) -> Registry:
    from ktcore.backends import torch_backends

    registry = Registry()
    torch_backends.register(registry)
    for spec in specs:
        registry.add(spec)
    return registry


def test_unknown_backend_suggests_the_closest_names():
    registry = _registry_with()
    with pytest.raises(BackendError, match=r"unknown backend 'trch'.*did you mean 'torch'"):
        registry.get("trch", "experts")


def test_backend_without_the_operator_lists_what_it_has():
    registry = _registry_with(BackendSpec("cpuonly", "experts", ("cpu",), "x:y"))
    with pytest.raises(BackendError, match=r"has no 'linear' operator; it provides: experts"):
        registry.get("cpuonly", "linear")


def test_probe_reason_is_cached_and_a_raising_probe_is_unavailable():
    calls = []

    def probe():
        calls.append(1)
        return "no AVX-512 on this CPU"

    def bad_probe():
        raise OSError("cannot read /proc/cpuinfo")

    registry = _registry_with(BackendSpec("probed", "experts", ("cpu",), "x:y", probe=probe),
                              BackendSpec("badprobe", "experts", ("cpu",), "x:y", probe=bad_probe))
    spec = registry.get("probed", "experts")
    assert registry.unavailable_reason(spec) == "no AVX-512 on this CPU"
    assert registry.unavailable_reason(spec) == "no AVX-512 on this CPU"
    assert len(calls) == 1
    assert "probe failed: OSError" in registry.unavailable_reason(registry.get("badprobe", "experts"))


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="Bad-Name"), "must match"),
    (dict(op="attention"), "unknown operator 'attention'"),
    (dict(devices=("tpu",)), "devices must be"),
    (dict(factory="no_colon"), "module:attr"),
])
def test_backend_spec_validates_on_construction(kwargs, message):
    base = dict(name="ok", op="experts", devices=("cpu",), factory="m:f")
    with pytest.raises(ValueError, match=message):
        BackendSpec(**{**base, **kwargs})


def test_option_spec_checks_type_and_choices():
    fmt = OptionSpec("format", str, ("int4", "int8"))
    assert fmt.check("int4") is None
    assert "one of 'int4', 'int8'" in fmt.check("int3")
    threads = OptionSpec("threads", int)
    assert "type int" in threads.check(True)
    assert OptionSpec("alpha", float).check(2) is None
