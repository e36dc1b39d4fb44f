// Placeholder, replaced by the CUDA runtime work (issue 3).
#pragma once
