"""The second example of the stateful-pool 0.3.2 README (non-blocking submit_*), unchanged.

Run: python examples/seed_readme_2.py
"""
from stateful_pool import SPool, SWorker
import time, random

# will run in another process
class SquareWorker(SWorker):
    def spawn(self, gpu_ids: list[int]):
        self.gpu_ids = gpu_ids
        return f"Worker initialized on GPU: {self.gpu_ids}"

    def execute(self, value):
        time.sleep(random.uniform(0.1, 1.0))
        return f"[Execute] Square of {value} is {value * value} (computed on GPU: {self.gpu_ids})"

if __name__ == "__main__":
    with SPool(SquareWorker) as pool:
        spawn_futures = [pool.submit_spawn(gpu_ids=[i, i+1]) for i in range(0, 4, 2)]
        for f in spawn_futures:
            print(f.result())
        execute_futures = [pool.submit_execute(i) for i in range(4)]
        for f in execute_futures:
            print(f.result())
