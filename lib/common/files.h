#pragma once

#include <sys/types.h>

#include <string>
#include <string_view>

#include "absl/status/status.h"

namespace meterd {

// Writes `content` to `path` whole: into a new temporary file beside it (created exclusively,
// given `mode`, synced), then renamed over `path`, so a reader never sees half a file and the
// content is never readable under a laxer mode. The error names the path and the reason.
absl::Status WriteFileAtomically(const std::string& path, std::string_view content,
                                 mode_t mode = 0644);

}  // namespace meterd
