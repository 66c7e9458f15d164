"""``fx bench``'s command: measure an experiment (on N GPUs through the launcher), write and compare results."""

from __future__ import annotations


def command(args) -> int:
    from fx import config
    from fx.bench import compare, measure
    from fx.errors import UserError
    from fx.quiet import quiet_libraries
    from fx.run import launch
    from fx.training.budget import use_expandable_segments

    use_expandable_segments()
    if args.compare and args.file is None and args.result is None:
        raise UserError("--compare needs an experiment file to run or --result with a result to compare")
    if args.result is not None:
        result = compare.read_result(args.result)
    else:
        exp = config.load(args.file, args.set)
        if (launched := launch.start(exp, args.gpus, args.argv)) is not None:
            return launched
        quiet_libraries()
        result = launch.as_rank(exp, lambda: measure.run(exp, steps=args.steps, warmup=args.warmup,
                                                         reference=args.reference, profile=args.profile))
        if launch.rank() != 0:
            return 0
        compare.report(result)
        if args.out:
            compare.write_result(args.out, result)
            print(f"result written to {args.out}")
    if args.compare:
        return compare.compare(compare.read_result(args.compare), result, args.tolerance)
    return 0
