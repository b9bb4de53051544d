"""gpt2-memengine: memory-optimized fine-tuning of GPT-2 up to gpt2-xl."""

__version__ = "0.1.0"

# A worker process the engine started (the planner's simulations) sends its stderr to the engine's log before
# anything is imported: the libraries' import-time notices then never reach the user's console (engine/notices.py).
_worker_log = __import__("os").environ.get("ENGINE_WORKER_STDERR")
if _worker_log:
    from engine.notices import stderr_to_file as _stderr_to_file

    _stderr_to_file(_worker_log)
