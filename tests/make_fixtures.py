"""Write tests/fixtures/<case>.npz: weights, inputs and transformers' outputs per case.

The parity tests compare against these files when torch/transformers are not installed,
so the parity line holds on any machine. Regenerate with

    python tests/make_fixtures.py

Each file records the torch, transformers and numpy versions that produced it.
"""

import json
from pathlib import Path

import numpy as np
from cases import CASES, build
from hf_reference import VERSIONS, hf_model, hf_outputs

from nystrom_np import to_state_dict

OUT = Path(__file__).parent / "fixtures"


def main():
    OUT.mkdir(exist_ok=True)
    for name in CASES:
        model, ids, mask, types = build(name)
        logits, hidden = hf_outputs(hf_model(model), ids, mask, types)
        arrays = {f"state/{k}": v for k, v in to_state_dict(model).items()}
        arrays.update({f"hidden/{i}": h for i, h in enumerate(hidden)})
        arrays["ids"] = ids
        if mask is not None:
            arrays["mask"] = mask
        if types is not None:
            arrays["types"] = types
        if logits is not None:
            arrays["logits"] = logits
        meta = {"case": name, "config": model.config.to_dict(), "versions": VERSIONS}
        arrays["meta"] = np.array(json.dumps(meta))
        np.savez_compressed(OUT / f"{name}.npz", **arrays)
        print(f"wrote {name}.npz ({(OUT / f'{name}.npz').stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
