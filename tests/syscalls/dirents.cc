// getdents64(2) through readdir, mkdir, mkdirat, rmdir, unlink, unlinkat, rename, renameat,
// renameat2, link, linkat, symlinkat, getcwd, chdir, fchdir, umask.

#include <dirent.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <sys/syscall.h>
#include <sys/stat.h>

#include <set>

#include "check.h"

static std::set<std::string> list(const std::string& dir) {
  std::set<std::string> names;
  DIR* d = opendir(dir.c_str());
  if (d == nullptr) {
    return names;
  }
  while (dirent* e = readdir(d)) {
    names.insert(e->d_name);
  }
  closedir(d);
  return names;
}

int main() {
  std::string dir = conf::tmpPath("d");
  CHECK(mkdir(dir.c_str(), 0755) == 0);
  CHECK_FAILS(mkdir(dir.c_str(), 0755), EEXIST);
  for (const char* n : {"a", "b", "c"}) {
    int fd = open((dir + "/" + n).c_str(), O_CREAT | O_WRONLY, 0644);
    CHECK(fd >= 0);
    close(fd);
  }
  int dfd = open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  CHECK(dfd >= 0);
  CHECK(mkdirat(dfd, "sub", 0700) == 0);
  CHECK((list(dir) == std::set<std::string>{".", "..", "a", "b", "c", "sub"}));

  // Many entries: more than one getdents64 buffer's worth.
  for (int i = 0; i < 300; ++i) {
    std::string n = "many-entry-with-a-long-name-" + std::to_string(i);
    int fd = openat(dfd, n.c_str(), O_CREAT | O_WRONLY, 0644);
    CHECK(fd >= 0);
    close(fd);
  }
  CHECK(list(dir).size() == 306);
  for (int i = 0; i < 300; ++i) {
    std::string n = "many-entry-with-a-long-name-" + std::to_string(i);
    CHECK(unlinkat(dfd, n.c_str(), 0) == 0);
  }

  CHECK(rename((dir + "/a").c_str(), (dir + "/d").c_str()) == 0);
  CHECK(renameat(dfd, "d", dfd, "e") == 0);
  CHECK(syscall(SYS_renameat2, dfd, "e", dfd, "b", RENAME_NOREPLACE) == -1 && errno == EEXIST);
  CHECK(link((dir + "/b").c_str(), (dir + "/b2").c_str()) == 0);
  CHECK(linkat(dfd, "c", dfd, "c2", 0) == 0);
  struct stat st;
  CHECK(stat((dir + "/b").c_str(), &st) == 0 && st.st_nlink == 2);
  CHECK(symlinkat("b", dfd, "s") == 0);
  CHECK((list(dir) == std::set<std::string>{".", "..", "b", "b2", "c", "c2", "e", "s", "sub"}));

  CHECK_FAILS(rmdir(dir.c_str()), ENOTEMPTY);
  CHECK_FAILS(unlink((dir + "/sub").c_str()), EISDIR);
  CHECK_FAILS(rmdir((dir + "/b").c_str()), ENOTDIR);
  CHECK_FAILS(unlink((dir + "/zz").c_str()), ENOENT);
  CHECK(unlinkat(dfd, "sub", AT_REMOVEDIR) == 0);
  for (const char* n : {"b", "b2", "c", "c2", "e", "s"}) {
    CHECK(unlink((dir + "/" + n).c_str()) == 0);
  }
  CHECK((list(dir) == std::set<std::string>{".", ".."}));

  // The working directory.
  char cwd[4096];
  CHECK(getcwd(cwd, sizeof cwd) != nullptr);
  std::string start = cwd;
  CHECK(chdir(dir.c_str()) == 0);
  CHECK(getcwd(cwd, sizeof cwd) != nullptr);
  char real[4096];
  CHECK(realpath(dir.c_str(), real) != nullptr);
  CHECK(std::string(cwd) == real);
  char tiny[4];
  CHECK(getcwd(tiny, sizeof tiny) == nullptr && errno == ERANGE);
  int fd = open("rel", O_CREAT | O_WRONLY, 0666);  // relative to the new cwd
  CHECK(fd >= 0);
  close(fd);
  CHECK(access((dir + "/rel").c_str(), F_OK) == 0);
  mode_t old = umask(077);
  fd = open("masked", O_CREAT | O_WRONLY, 0666);
  CHECK(fd >= 0);
  CHECK(fstat(fd, &st) == 0 && (st.st_mode & 0777) == 0600);
  close(fd);
  CHECK(umask(old) == 077);
  int startFd = open(start.c_str(), O_RDONLY | O_DIRECTORY);
  CHECK(startFd >= 0);
  CHECK(fchdir(startFd) == 0);
  CHECK(getcwd(cwd, sizeof cwd) != nullptr && start == cwd);
  CHECK_FAILS(chdir(conf::tmpPath("nowhere").c_str()), ENOENT);
  close(startFd);
  close(dfd);
  return conf::finish();
}
