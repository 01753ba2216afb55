"""Where steps run: subinterpreter, process and auto, and how to see what each resolved to."""
