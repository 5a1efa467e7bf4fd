"""The binding's DLPack ingestion, which every op shares: garbage producers and forged capsules are
refused naming the argument, and every capsule the binding consumed is deleted exactly once."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from core_args import (
    BE,
    FLAG_IS_COPIED,
    FLAG_READ_ONLY,
    TE,
    VE,
    B,
    DeviceLies,
    DeviceNotInts,
    DeviceNotTuple,
    DeviceRaises,
    DeviceUnsupported,
    DeviceWrongArity,
    DlpackNotCallable,
    DlpackRaises,
    Forged,
    N,
    NoDeviceMethod,
    NonCapsuleProducer,
    ReusedCapsule,
    bad_input_test,
    case,
    empty,
    f32,
)
from diffinstruct import _core

# --------------------------------------------------------------------------- garbage producers


CASES = [
    # ---- garbage DLPack producers (fed to fill_uniform's out or to ta_loss's x0)
    case(
        "dlpack-non-capsule",
        "fill_uniform",
        BE,
        r"^out: __dlpack__ returned an already used or unknown capsule",
        lambda kw: {"out": NonCapsuleProducer()},
    ),
    case(
        "dlpack-device-not-tuple",
        "fill_uniform",
        BE,
        r"^out: __dlpack_device__ did not return \(device_type, device_id\)",
        lambda kw: {"out": DeviceNotTuple()},
    ),
    case(
        "dlpack-device-wrong-arity",
        "fill_normal",
        BE,
        r"^out: __dlpack_device__ did not return",
        lambda kw: {"out": DeviceWrongArity()},
    ),
    case(
        "dlpack-device-not-ints",
        "fill_normal",
        BE,
        r"^out: __dlpack_device__ did not return",
        lambda kw: {"out": DeviceNotInts()},
    ),
    case(
        "dlpack-device-raises",
        "fill_uniform",
        BE,
        r"^out: __dlpack_device__\(\) failed \(KeyError",
        lambda kw: {"out": DeviceRaises()},
    ),
    case(
        "dlpack-device-missing",
        "ta_loss",
        TE,
        r"^x0: NoDeviceMethod has __dlpack__ but no __dlpack_device__",
        lambda kw: {"x0": NoDeviceMethod()},
    ),
    case(
        "dlpack-device-unsupported",
        "ta_loss",
        VE,
        r"^x0: unsupported device type 13",
        lambda kw: {"x0": DeviceUnsupported()},
    ),
    case(
        "dlpack-device-lies",
        "ta_loss",
        BE,
        r"^x0: (__dlpack__ returned a tensor on device|__dlpack__\(\) failed)",
        lambda kw: {"x0": DeviceLies()},
    ),
    case(
        "dlpack-producer-raises",
        "ta_loss",
        BE,
        r"^x0: __dlpack__\(\) failed \(RuntimeError: producer failure\)",
        lambda kw: {"x0": DlpackRaises()},
    ),
    case(
        "dlpack-not-callable",
        "fill_uniform",
        BE,
        r"^out: __dlpack__\(\) failed \(TypeError",
        lambda kw: {"out": DlpackNotCallable()},
    ),
    case(
        "dlpack-capsule-reused",
        "fill_uniform",
        BE,
        r"^out: __dlpack__ returned an already used or unknown capsule",
        lambda kw: {"out": ReusedCapsule()},
    ),
    case(
        "forged-capsule-name",
        "fill_uniform",
        BE,
        r"^out: __dlpack__ returned an already used or unknown capsule",
        lambda kw: {"out": Forged(name=b"not_a_tensor")},
    ),
    case(
        "forged-device-mismatch",
        "fill_uniform",
        BE,
        r"^out: __dlpack__ returned a tensor on device \(2, 0\) but __dlpack_device__ said \(1, 0\)",
        lambda kw: {"out": Forged(capsule_device=(2, 0))},
    ),
    case(
        "forged-null-shape",
        "fill_uniform",
        BE,
        r"^out: DLPack tensor has 2 dimensions but no shape",
        lambda kw: {"out": Forged(null_shape=True)},
    ),
    case(
        "forged-null-data",
        "fill_uniform",
        BE,
        r"^out: DLPack tensor has a NULL data pointer",
        lambda kw: {"out": Forged(null_data=True)},
    ),
    case(
        "forged-major-version-2",
        "fill_uniform",
        BE,
        r"^out: DLPack major version 2 is not supported",
        lambda kw: {"out": Forged(major=2)},
    ),
    case(
        "forged-read-only-output",
        "fill_uniform",
        VE,
        r"^out: output tensor is read-only",
        lambda kw: {"out": Forged(flags=FLAG_READ_ONLY)},
    ),
    case(
        "forged-copied-output",
        "fill_uniform",
        BE,
        r"^out: __dlpack__ exported a copy",
        lambda kw: {"out": Forged(flags=FLAG_IS_COPIED)},
    ),
    case(
        "forged-17-dims",
        "fill_uniform",
        VE,
        r"^out: at most 16 dimensions",
        lambda kw: {"out": Forged(shape=(1,) * 17)},
    ),
    case(
        "forged-negative-dim",
        "fill_uniform",
        VE,
        r"^out: negative dimension",
        lambda kw: {"out": Forged(shape=(2, -3))},
    ),
    case(
        "forged-element-count-overflow",
        "fill_uniform",
        VE,
        r"^out: too many elements",
        lambda kw: {"out": Forged(shape=(2**40, 2**40))},
    ),
    case(
        "forged-two-lanes",
        "fill_uniform",
        TE,
        r"^out: expected dtype .*lanes 2",
        lambda kw: {"out": Forged(dtype=(2, 32, 2))},
    ),
    case(
        "forged-uint8",
        "fill_uniform",
        TE,
        r"^out: expected dtype .*DLPack code 1 bits 8",
        lambda kw: {"out": Forged(dtype=(1, 8, 1))},
    ),
    case(
        "forged-unaligned",
        "fill_uniform",
        VE,
        r"^out: data pointer is not aligned",
        lambda kw: {"out": Forged(byte_offset=2)},
    ),
    case(
        "forged-strided",
        "fill_uniform",
        VE,
        r"^out: expected a C-contiguous",
        lambda kw: {"out": Forged(shape=(3,), strides=(2,))},
    ),
]

test_bad_input = bad_input_test(CASES)


# --------------------------------------------------------------------------- DLPack ownership


def test_forged_capsule_is_used_and_deleted_once():
    """A well-formed hand-made capsule works, and its deleter runs exactly once."""
    producer = Forged(shape=(B, N))
    _core.fill_uniform(producer, 5)
    assert producer.deleted == 1
    written = producer.buf[: B * N]
    assert np.all((written > 0) & (written < 1))


REJECTED_CAPSULES = [
    pytest.param(versioned, falsify, id=f"{name}-{'versioned' if versioned else 'legacy'}")
    for name, falsify, kinds in [
        ("major2", {"major": 2}, (True,)),
        ("copied", {"flags": FLAG_IS_COPIED}, (True,)),
        ("read-only", {"flags": FLAG_READ_ONLY}, (True,)),
        ("device-mismatch", {"capsule_device": (2, 0)}, (True, False)),
        ("int32", {"dtype": (0, 32, 1)}, (True, False)),
        ("zero-size", {"shape": (0, N)}, (True, False)),
        ("strided", {"shape": (3,), "strides": (2,)}, (True, False)),
    ]
    for versioned in kinds
]


@pytest.mark.parametrize("versioned,falsify", REJECTED_CAPSULES)
def test_rejected_capsule_is_still_deleted(versioned, falsify):
    """Every rejected capsule that the binding consumed is handed back (deleter called once)."""
    producer = Forged(versioned=versioned, **falsify)
    with pytest.raises((TypeError, ValueError, BufferError), match=r"^out"):
        _core.fill_uniform(producer, 5)
    assert producer.deleted == 1


def test_versioned_read_only_input_is_accepted():
    """READ_ONLY only matters for outputs."""
    x = Forged(shape=(B, N), flags=FLAG_READ_ONLY)
    x.buf[:] = 1.0
    loss = empty(B)
    _core.ta_loss(x, np.zeros((B, N), np.float32), loss, weighting="unit", reduction="sum")
    np.testing.assert_allclose(loss, [N, N])
    assert x.deleted == 1


def test_producer_error_keeps_its_cause():
    """The BufferError that names the argument chains the producer's own exception."""
    with pytest.raises(BufferError, match=r"^x0: __dlpack__\(\) failed") as info:
        _core.ta_loss(f32(B, N), DlpackRaises(), empty(B), weighting="unit")
    assert isinstance(info.value.__cause__, RuntimeError)
    assert str(info.value.__cause__) == "producer failure"


class Interrupting(NonCapsuleProducer):
    def __dlpack__(self, **kwargs):
        raise KeyboardInterrupt


def test_producer_keyboard_interrupt_is_not_wrapped():
    with pytest.raises(KeyboardInterrupt):
        _core.fill_uniform(Interrupting(), 1)


def test_producer_mutating_the_list_does_not_crash():
    """A __dlpack__ that empties the caller's lists while the binding walks them must not crash.

    Runs in a subprocess: before the fix this was a segfault (the binding indexed the live list)."""
    code = textwrap.dedent(
        """
        import numpy as np
        from diffinstruct import _core

        class Evil:
            def __init__(self, lists):
                self.lists = lists
            def __dlpack_device__(self):
                return (1, 0)
            def __dlpack__(self, **kwargs):
                for lst in self.lists:
                    lst.clear()
                return np.zeros(4, np.float32).__dlpack__(**kwargs)

        ema, params = [], [np.zeros(4, np.float32), np.zeros(4, np.float32)]
        ema.extend([Evil([ema, params]), np.zeros(4, np.float32)])
        _core.ema_update(ema, params, 0.5)
        p, g = [], [np.ones(4, np.float32)]
        m, v = [np.zeros(4, np.float32)], [np.zeros(4, np.float32)]
        p.append(Evil([p, g, m, v]))
        _core.adam_step(p, g, m, v, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.strip() == "ok"
