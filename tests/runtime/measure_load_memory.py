"""Run as a script: loads a model and prints the loading's peak and final host memory (JSON).

Usage: python measure_load_memory.py MODEL_DIR [GGUF]. The modeling code is imported before
the baseline, so the figures hold the weights and the loading's temporaries only.
"""

import gc
import json
import sys


def status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def main() -> None:
    import ktcore
    from ktcore.models.skeleton import build_skeleton, load_config

    model_dir, gguf = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
    build_skeleton(load_config(model_dir))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current size
    base = status_bytes("VmRSS")
    model = ktcore.load(model_dir, gguf=gguf, dtype="fp32", max_seq_len=8)
    gc.collect()
    tensors = list(model.decoder.parameters()) + list(model.decoder.buffers())
    weights = sum(t.numel() * t.element_size() for t in tensors)
    peak, final = status_bytes("VmHWM") - base, status_bytes("VmRSS") - base
    print(json.dumps({"weights": weights, "peak": peak, "final": final, "peak_ratio": peak / weights}))


if __name__ == "__main__":
    main()
