"""Compare two chain work dirs of the same pipeline (e.g. the demo run by two commits):
their summaries (APs), each stage's ``latest.pth`` (weights, optimizer state, loop state) and
every stored object of their caches (sha256 per file).

    python tools/compare_chains.py WORK_DIR_A WORK_DIR_B
"""
import hashlib, json, os, sys
import torch
a, b = sys.argv[1], sys.argv[2]
sa, sb = json.load(open(f"{a}/summary.json")), json.load(open(f"{b}/summary.json"))
print("summary A:", json.dumps(sa)[:400]); print("summary B:", json.dumps(sb)[:400])
for role in ("teacher", "student-baseline", "student-ld"):
    pa, pb = f"{a}/{role}/latest.pth", f"{b}/{role}/latest.pth"
    ca, cb = torch.load(pa, weights_only=True), torch.load(pb, weights_only=True)
    same_w = ca["state_dict"].keys() == cb["state_dict"].keys() and all(torch.equal(ca["state_dict"][k], cb["state_dict"][k]) for k in ca["state_dict"])
    oa, ob = ca["optimizer"]["state"], cb["optimizer"]["state"]
    same_o = oa.keys() == ob.keys() and all(torch.equal(oa[k]["momentum_buffer"], ob[k]["momentum_buffer"]) for k in oa)
    same_file = open(pa, "rb").read() == open(pb, "rb").read()
    ra, rb = ca.get("rng") or {}, cb.get("rng") or {}
    same_rng = ra.keys() == rb.keys() and all(
        torch.equal(ra[k], rb[k]) if torch.is_tensor(ra[k]) else ra[k] == rb[k] for k in ra)
    same_scaler = ca.get("scaler") == cb.get("scaler")
    print(f"{role}: weights identical {same_w}, optimizer state identical {same_o}, RNG state identical "
          f"{same_rng}, scaler identical {same_scaler}, files byte-identical {same_file}, "
          f"loop A {ca.get('loop')} B {cb.get('loop')}")
def objects(root):
    out = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(d, f); r = os.path.relpath(p, root)
            out[r] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out
for cache in sorted(os.listdir(f"{a}/caches")):
    oa, ob = objects(f"{a}/caches/{cache}"), objects(f"{b}/caches/{cache}")
    diff = sorted(k for k in oa.keys() | ob.keys() if oa.get(k) != ob.get(k))
    print(f"cache {cache}: {len(oa)} / {len(ob)} objects, differing: {diff}")
