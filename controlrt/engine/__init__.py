"""TensorRT engines: profiles from the graph specs, building, caching, refitting.

Only controlrt.engine.trt and the modules that call it import tensorrt, and only when used, so the
package and everything else works where TensorRT is not installed.
"""
