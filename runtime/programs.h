#pragma once
// Where umosix programs find each other (mos-deputy, mos-supervisor, mosd, ...).

#include <string>

namespace mos {

// Returns the absolute path of the umosix program `name`. Looks in, in order: $UMOSIX_LIBEXEC,
// the directory of /proc/self/exe, and its siblings ../tools, ../deputy, ../remote,
// ../libmigrate (the Meson build tree). Throws kj::Exception (FAILED) naming `name` when none
// has an executable file of that name.
std::string programPath(const std::string& name);

}  // namespace mos
