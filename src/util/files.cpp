// util/files.cpp: POSIX implementations of util/files.h.
#include "util/files.h"

#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <sstream>

#include "tiedlora/error.h"

namespace tiedlora::util {
namespace {

std::string errno_text() { return std::strerror(errno); }

bool stat_mode(const std::string& path, mode_t type) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && (st.st_mode & S_IFMT) == type;
}

}  // namespace

bool is_directory(const std::string& path) { return stat_mode(path, S_IFDIR); }
bool is_regular_file(const std::string& path) { return stat_mode(path, S_IFREG); }
bool path_exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

std::string join_path(const std::string& folder, const std::string& name) {
  if (folder.empty()) return name;
  return folder.back() == '/' ? folder + name : folder + "/" + name;
}

std::string parent_path(const std::string& path) {
  std::string p = path;
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  const auto slash = p.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : p.substr(0, slash);
}

std::vector<std::string> list_directory(const std::string& folder) {
  DIR* dir = ::opendir(folder.c_str());
  if (!dir) throw Error(folder + ": cannot list the folder: " + errno_text());
  std::vector<std::string> names;
  while (dirent* entry = ::readdir(dir)) {
    const std::string name = entry->d_name;
    if (name != "." && name != "..") names.push_back(name);
  }
  ::closedir(dir);
  std::sort(names.begin(), names.end());
  return names;
}

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw FormatError(path + ": cannot open: " + errno_text());
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

std::string make_temp_directory_beside(const std::string& destination) {
  std::string pattern = destination;
  while (pattern.size() > 1 && pattern.back() == '/') pattern.pop_back();
  pattern += ".tmp-XXXXXX";
  std::vector<char> buffer(pattern.begin(), pattern.end());
  buffer.push_back('\0');
  if (!::mkdtemp(buffer.data())) throw Error(pattern + ": cannot create a temporary folder: " + errno_text());
  return buffer.data();
}

void remove_tree(const std::string& path) {
  if (!path_exists(path)) return;
  auto remove_one = [](const char* p, const struct stat*, int, struct FTW*) -> int { return ::remove(p); };
  if (::nftw(path.c_str(), remove_one, 16, FTW_DEPTH | FTW_PHYS) != 0 && path_exists(path)) {
    throw Error(path + ": cannot remove: " + errno_text());
  }
}

void remove_tree_quietly(const std::string& path) noexcept {
  try {
    remove_tree(path);
  } catch (...) {
    // Cleanup is best effort: the caller is already reporting the error that matters.
  }
}

void make_directories(const std::string& path) {
  for (std::size_t i = 1; i <= path.size(); ++i) {
    if (i == path.size() || path[i] == '/') {
      const std::string prefix = path.substr(0, i);
      if (::mkdir(prefix.c_str(), 0755) != 0 && errno != EEXIST) {
        throw Error(path + ": cannot create folder " + prefix + ": " + errno_text());
      }
    }
  }
  if (!is_directory(path)) throw Error(path + ": exists and is not a folder");
}

void write_file_atomically(const std::string& path, const std::function<void(const ByteWriter&)>& fill) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw Error(tmp + ": cannot create: " + errno_text());
  try {
    const ByteWriter write_bytes = [&](const void* data, std::size_t size) {
      const char* p = static_cast<const char*>(data);
      while (size > 0) {
        const ssize_t n = ::write(fd, p, std::min<std::size_t>(size, std::size_t{1} << 30));
        if (n < 0) {
          if (errno == EINTR) continue;
          throw Error(tmp + ": write failed: " + errno_text());
        }
        p += n;
        size -= static_cast<std::size_t>(n);
      }
    };
    fill(write_bytes);
    if (::fsync(fd) != 0) throw Error(tmp + ": fsync failed: " + errno_text());
    const int rc = ::close(fd);
    fd = -1;
    if (rc != 0) throw Error(tmp + ": close failed: " + errno_text());
    if (::rename(tmp.c_str(), path.c_str()) != 0) {
      throw Error(path + ": cannot rename " + tmp + " into place: " + errno_text());
    }
  } catch (...) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  // Make the rename itself durable; failure here does not undo the write, so it is not an error.
  const int dir = ::open(parent_path(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir >= 0) {
    ::fsync(dir);
    ::close(dir);
  }
}

void copy_file(const std::string& from, const std::string& to) {
  const int in = ::open(from.c_str(), O_RDONLY | O_CLOEXEC);
  if (in < 0) throw Error(from + ": cannot open: " + errno_text());
  const int out = ::open(to.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (out < 0) {
    ::close(in);
    throw Error(to + ": cannot create: " + errno_text());
  }
  std::vector<char> buffer(1 << 20);
  ssize_t n;
  bool ok = true;
  while ((n = ::read(in, buffer.data(), buffer.size())) > 0) {
    for (ssize_t done = 0; done < n;) {
      const ssize_t w = ::write(out, buffer.data() + done, static_cast<size_t>(n - done));
      if (w < 0 && errno == EINTR) continue;
      if (w < 0) {
        ok = false;
        break;
      }
      done += w;
    }
    if (!ok) break;
  }
  ok = ok && n == 0 && ::fsync(out) == 0;
  ::close(in);
  ok = (::close(out) == 0) && ok;
  if (!ok) throw Error(to + ": copying " + from + " failed: " + errno_text());
}

void publish_directory(const std::string& staged, const std::string& destination_in, bool overwrite) {
  std::string destination = destination_in;
  while (destination.size() > 1 && destination.back() == '/') destination.pop_back();  // "out/" is "out"
  std::string aside;
  if (path_exists(destination)) {
    if (!overwrite) {
      throw Error(destination + ": already exists (hint: choose another output folder or pass --force)");
    }
    aside = make_temp_directory_beside(destination + ".old");
    ::rmdir(aside.c_str());
    if (::rename(destination.c_str(), aside.c_str()) != 0) {
      throw Error(destination + ": cannot move the old folder aside: " + errno_text());
    }
  }
  if (::rename(staged.c_str(), destination.c_str()) != 0) {
    const std::string reason = errno_text();
    if (!aside.empty()) ::rename(aside.c_str(), destination.c_str());
    throw Error(destination + ": cannot move " + staged + " into place: " + reason);
  }
  const int dir = ::open(parent_path(destination).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir >= 0) {
    ::fsync(dir);
    ::close(dir);
  }
  if (!aside.empty()) remove_tree_quietly(aside);  // the new folder is in place; a leftover is only clutter
}

}  // namespace tiedlora::util
