// FlashMoE device code shared by every kernel. Compiled by NVRTC with no CUDA toolkit headers.
#pragma once
