"""The examples in `keras_sara.decoding`'s docstrings run and print what they say."""

import doctest

from keras_sara import decoding


def test_decoding_docstring_examples_run():
    result = doctest.testmod(decoding, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted >= 8 and result.failed == 0, result
