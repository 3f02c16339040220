import gc, os
if os.environ.get("KVS_GC_EXPERIMENT") == "on":
    gc.set_threshold(20000, 50, 100)
