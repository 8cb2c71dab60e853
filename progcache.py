import sys, time, runpy, hashlib, pickle
sys.path.insert(0, "/work/main")
import tinygrad.codegen as cg
import tinygrad.engine.realize as rl
from tinygrad.helpers import diskcache_get, diskcache_put
stats = {"hit": 0, "miss": 0, "put": 0}
class Disk(dict):
    @staticmethod
    def _k(key):
        return hashlib.sha256(pickle.dumps((key[0], key[1].__module__, key[1].__qualname__) + tuple(key[2:]))).hexdigest()
    def __contains__(self, key):
        if dict.__contains__(self, key): return True
        v = diskcache_get("program", self._k(key))
        if v is None: stats["miss"] += 1; return False
        stats["hit"] += 1
        dict.__setitem__(self, key, v); return True
    def __setitem__(self, key, v):
        dict.__setitem__(self, key, v); stats["put"] += 1
        diskcache_put("program", self._k(key), v)
d = Disk(); rl.to_program_cache = d; cg.to_program_cache = d
