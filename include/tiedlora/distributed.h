// tiedlora/distributed.h: the data-parallel layer (target tiedlora::distributed; over the models and
// training): the launcher's environment and the MPI and NCCL process groups behind the Trainer's
// ProcessGroup interface.
#pragma once

#include "tiedlora/distributed/launch.h"
#include "tiedlora/llm.h"
