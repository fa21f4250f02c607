"""Planning: the cost model, Halda (prima.cpp's layer-to-device planner) and every system's planner."""
