"""One style of progress bar for long work; quiet when output is not a terminal (logs, CI)."""

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress(disable: bool = False) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        transient=False,
        disable=disable,
    )


def map_chunks(fn, jobs: list, description: str, total: int, workers: int = 1, mp_context=None) -> list:
    """fn(job) -> list for every job, in order, in `workers` processes, with a progress bar over `total` items."""
    from concurrent.futures import ProcessPoolExecutor

    results: list = []
    with progress() as bar:
        task = bar.add_task(description, total=total, info="")
        pool = (
            ProcessPoolExecutor(max_workers=workers, mp_context=mp_context) if workers > 1 and len(jobs) > 1 else None
        )
        try:
            for out in (pool.map if pool else map)(fn, jobs):
                results += out
                bar.advance(task, len(out))
        finally:
            if pool:
                pool.shutdown()
    return results
