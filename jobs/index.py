"""index: not built yet."""


def add_arguments(parser):
    pass


def run(spark, args):
    raise NotImplementedError
