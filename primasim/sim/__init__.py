"""The SimPy simulator: devices (CPU, GPU, disk, RAM + OS page cache), Wi-Fi, and every system's
schedule on them. `simulate(system, model, cluster)` returns a SimResult with a Trace in the schema
the runtime shares (primasim.core.trace), its Metrics, and the plan simulated.
"""

from primasim.plan.planners import (
    make_plan as make_plan,  # planner=sim included: ._planning registers it
)

from ._api import simulate_plan as simulate_plan
from ._config import SimConfig as SimConfig, config_help as config_help
from ._context import SimContext as SimContext, SimResult as SimResult
from ._engine import Recorder as Recorder, Server as Server
from ._feedback import sim_corrections as sim_corrections
from ._network import Network as Network
from ._pagecache import PageCache as PageCache
from ._planner import SimPlanResult as SimPlanResult, sim_plan as sim_plan
from ._planning import sim_planner_plan as sim_planner_plan, simulate as simulate
from ._serving import (
    Departure as Departure,
    Recovery as Recovery,
    ServeResult as ServeResult,
    serve_workload as serve_workload,
)
from ._systems import (
    SYSTEMS as SYSTEMS,
    SystemEntry as SystemEntry,
    get_system as get_system,
    system_names as system_names,
)
from ._timing import DeviceTiming as DeviceTiming

__all__ = ["simulate", "simulate_plan", "make_plan", "sim_planner_plan", "SimConfig", "config_help", "SimContext",
           "SimResult", "Recorder", "Server", "Network", "PageCache", "SYSTEMS", "SystemEntry", "get_system",
           "system_names", "DeviceTiming", "sim_corrections", "SimPlanResult", "sim_plan", "serve_workload",
           "ServeResult", "Departure", "Recovery"]
