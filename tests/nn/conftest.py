# install the stand-in ops (only while the real ones are missing) before any test module runs
import tests.hf.scaffold  # noqa: F401
